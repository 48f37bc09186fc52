"""`python -m benchmarks.gpu_summary RESULTS_DIR`."""

from benchmarks.gpu_summary.render import main

raise SystemExit(main())

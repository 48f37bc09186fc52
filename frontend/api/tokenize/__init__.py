"""POST /tokenize and POST /detokenize, with vLLM's request and response shapes."""

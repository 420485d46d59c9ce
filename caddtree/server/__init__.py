"""`caddtree serve`: an OpenAI-compatible HTTP server, a thin layer over `caddtree.api.Pair`."""

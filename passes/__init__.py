"""Graph passes: capture a model as an FX graph, match quantizable sites, insert quantizers."""

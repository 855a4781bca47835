"""`qcompile demo` and its material: the real all-MiniLM-L6-v2 loader (`minilm`), the Python
standard library as a text corpus (`corpus`) and a small character-level GPT (`char_gpt`).
The library never imports this package; the CLI, benchmarks and examples do."""

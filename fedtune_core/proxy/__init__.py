"""Where the tiny proxies come from: glyph corpus, objectives, pre-training, probe."""

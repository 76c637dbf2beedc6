"""Quantized directories: one writer, one manifest schema, several sources.

    manifest.py  the directory's layout and manifest; reading and verifying it (load_model's side)
    quantize.py  quantize(src, dst): the resumable writer, fed by a local checkpoint or by shards
    hub.py       the Hub as a source (one shard downloaded at a time); downloading a finished one
    authors.py   the paper authors' HQQ 0.1 layout as a source
"""

"""The built-in model ``tiny``: a 9.1M-parameter Mixtral-architecture model trained on the Python
standard library, shipped in ``weights/`` so that everything runs offline.

    train.py   the trainer (python -m moe_colab.tiny.train)
    data.py    corpus, tokenizer, batches
    card.py    the model card and docs/tiny_model.md from the training metrics
"""

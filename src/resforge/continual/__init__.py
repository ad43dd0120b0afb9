"""Keeping a deployed model current: versioned updates (`resforge update`) without catastrophic
forgetting, and the lineage of versions (`resforge versions`).

    versions.py   version folders RUN/versions/vN: atomic writes, hashes, lineage, MODEL arguments
    buffer.py     the class-balanced replay buffer (one safetensors file, reservoir or herding)
    head.py       class reconciliation by name (--rename/--merge) and growing the classifier
    methods.py    naive, replay (ER), lwf, derpp, weight aligning: loss terms for the one loop
    update.py     `update`: parent -> new data -> head -> train -> buffer -> evaluate -> version
    report.py     the update report: old/new/overall top-1, forgetting, BWT, accuracy matrix
    _shared.py    the pipeline functions borrowed from the training pipeline (one import site)
"""

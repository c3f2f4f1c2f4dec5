"""Human feedback for D3PO: a web page to label sampled images, the label store, export/import.

    python -m rlfuse.annotate <dataset> [--task best|pair|goodbad] [--host H] [--port P]
    python -m rlfuse.annotate export <dataset> --format d3po|pairs -o labels.json
    python -m rlfuse.annotate import <dataset> feedback.json [--annotator NAME]

The trainer reads preferences with rlfuse.annotate.store.preference_pairs(dataset). Nothing in
this package imports torch.
"""

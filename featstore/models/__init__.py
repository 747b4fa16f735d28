"""Network definitions that both extraction (pipelines/backbones/) and training (trainers/) build:
EVA-02's ViT (`eva02.py`: the UTA student's encoder and EVA-CLIP's vision tower).  torch only; it
imports nothing else of featstore, and `import featstore` does not load it."""

"""Flax NNX models of the three families AdaRank merges: CLIP ViT, RoBERTa/BERT, GPT-2."""

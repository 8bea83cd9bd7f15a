"""Flax NNX models of the three architectures AdaRank merges: CLIP ViT, RoBERTa/BERT, GPT-2."""

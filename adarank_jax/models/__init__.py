"""Flax NNX models of the architectures AdaRank merges: CLIP ViT, RoBERTa/BERT, GPT-2, Llama/Mistral/Qwen2."""

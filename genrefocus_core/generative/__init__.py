"""The generative family: DeblurNet and BokehNet on FLUX.1-dev (condition tokens, the multi-branch
forward, LoRA adapters, the exact sampler, model-file loading, memory modes, prompt embeddings)."""

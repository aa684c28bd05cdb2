"""msl_ds: multi-stage continual fine-tuning of causal LMs on DeepSpeed."""

import os

# Every model, tokenizer and embedder msl_ds loads is a local directory: never reach for the
# Hugging Face Hub (set before huggingface_hub reads it at import; HF_HUB_OFFLINE=0 opts out).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

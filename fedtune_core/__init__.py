"""fedtune: federated fine-tuning of pre-trained Transformers."""

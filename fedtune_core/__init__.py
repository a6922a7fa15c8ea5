"""fedtune: federated fine-tuning of pre-trained Transformers (CLIP, ViT)."""

import warnings

# huggingface_hub imports tqdm.auto, which warns inside Jupyter kernels without ipywidgets;
# text progress bars are what we want in notebooks and in their HTML exports.
warnings.filterwarnings("ignore", message="IProgress not found")

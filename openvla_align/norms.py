"""Image normalisation constants (per-channel mean and std on [0, 1] RGB) of the vision models involved: OpenVLA's
fused backbone (DINOv2: ImageNet's; SigLIP: 0.5) and the teachers (CLIP's for RADIO). Torch-free; defined here once."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

"""Ray Serve apps of LoRA-Diffusion: `serve_apps.app`, configured by `lora_diffusion.yaml`."""

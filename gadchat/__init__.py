"""GAD-Chat: black-box on-policy distillation (Generative Adversarial Distillation) of chat LLMs
on a DeepSpeed + vLLM hybrid engine."""

__version__ = "0.1.0"

"""Chat generation from a Hugging Face model folder: an exported actor, a training output dir (its
``final/actor``), or a hub id, on top of a generation backend (:mod:`gadchat.generation.backend`).

``Generator(model, backend="auto")`` uses vLLM where it is installed and transformers ``generate``
otherwise (``backend="vllm"`` / ``"hf"`` forces one). Prompts are lists of chat messages; the
tokenizer's chat template with the generation prompt turns them into tokens, exactly as in training
(:func:`gadchat.data.encode_prompt`). ``temperature == 0`` is greedy decoding; otherwise sampling
with ``temperature`` and ``top_p``; ``n`` samples per prompt. Each sample is a :class:`Completion`:
its text (decoded with the tokenizer, special tokens removed, cut at the first EOS),
``finish_reason`` (``"stop"`` = it ended with an EOS, ``"length"`` = it hit ``max_new_tokens``) and
the number of generated tokens (including the EOS).

Streaming: :meth:`Generator.stream` calls ``on_text`` with pieces of text as they are produced
(transformers ``TextIteratorStreamer``) where the backend streams; otherwise it calls it once with
the whole text.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path

from gadchat.generation.backends import backend_class
from gadchat.models import resolve_model_path


def same_model_shape(a: str, b: str) -> bool:
    """Two model folders hold the same architecture, tokenizer and generation settings (their
    weights may differ): ``config.json`` equal but for its path and dtype fields, the tokenizer
    files and ``generation_config.json`` byte for byte."""
    import json

    def config(folder):
        data = json.loads((Path(folder) / "config.json").read_text())
        return {k: v for k, v in data.items() if k not in ("_name_or_path", "torch_dtype", "dtype", "transformers_version")}

    def same_file(name):
        x, y = Path(a) / name, Path(b) / name
        return x.exists() == y.exists() and (not x.exists() or x.read_bytes() == y.read_bytes())

    try:
        return config(a) == config(b) and all(map(same_file, ("tokenizer.json", "tokenizer_config.json",
                                                              "generation_config.json")))
    except (OSError, ValueError):
        return False


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 = greedy decoding."""
    top_p: float = 1.0
    n: int = 1
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    text: str
    finish_reason: str
    """``"stop"`` (ended with an EOS) or ``"length"`` (hit ``max_new_tokens``)."""
    num_tokens: int
    token_ids: tuple = ()
    """The generated token ids, up to and including the first EOS (what a scorer should read)."""


class Generator:
    """Chat generation from a model folder or hub id; see the module docstring.

    ``backend`` (after construction) is the :class:`~gadchat.generation.backend.GenerationBackend`
    it generates with; ``backend.name`` says which.
    """

    def __init__(self, model: str, backend: str = "auto", dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, trust_remote_code: bool = False, batch_size: int = 16,
                 gpu_memory_utilization: float = 0.85):
        from transformers import AutoTokenizer

        self.model_path = resolve_model_path(model)
        backend_cls = backend_class(backend)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.model_path} has no chat template; a chat model is needed")
        self.backend = backend_cls.from_model_folder(
            self.model_path, self.tokenizer, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            max_model_len=max_model_len, batch_size=batch_size, gpu_memory_utilization=gpu_memory_utilization)
        self.eos_ids = sorted(self.backend.eos_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def close(self) -> None:
        """Free the model (before loading the next one in the same process)."""
        self.backend.close()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def switch_model(self, model: str) -> bool:
        """Generate from another model folder of the same shape with this engine: its weights are
        loaded into the backend in place (vLLM's in-place reload, as after an actor update), so no
        new engine is started. False, with nothing changed, when the backend keeps no weights of its
        own (transformers) or the folder's config, tokenizer or EOS set differ; build a new
        :class:`Generator` then. Every generate call reseeds, so what follows equals a fresh engine's."""
        from safetensors.torch import load_file

        path = resolve_model_path(model)
        files = sorted(Path(path).glob("*.safetensors"))
        if not (self.backend.follows_actor and files and same_model_shape(self.model_path, path)):
            return False
        weights = {}
        for file in files:
            weights.update(load_file(str(file)))
        self.backend.load_weights(iter(weights.items()))
        self.model_path = path
        return True

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_ids(self, messages: list) -> list:
        from gadchat.data import encode_prompt

        return encode_prompt(self.tokenizer, messages)

    def _completion(self, tokens: list, max_new_tokens: int | None = None) -> Completion:
        """The completion of generated ``tokens``: cut after the first EOS, "length" when there is none."""
        eos = set(self.eos_ids)
        for position, token in enumerate(tokens):
            if token in eos:
                text = self.tokenizer.decode(tokens[:position], skip_special_tokens=True)
                return Completion(text, "stop", position + 1, tuple(tokens[: position + 1]))
        return Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), "length", len(tokens), tuple(tokens))

    # -- generation ------------------------------------------------------------------------------
    def generate(self, conversations: list, settings: GenerationSettings | None = None, progress: bool = False) -> list:
        """``settings.n`` :class:`Completion` per conversation (a list of chat messages)."""
        settings = settings or GenerationSettings()
        prompts = [self.prompt_ids(messages) for messages in conversations]
        responses = self.backend.generate(prompts, settings.n, settings.temperature, settings.top_p,
                                          settings.max_new_tokens, settings.seed, greedy=settings.greedy,
                                          progress=progress)
        return [[self._completion(tokens) for tokens in group] for group in responses]

    def stream(self, messages: list, settings: GenerationSettings | None = None, on_text=None) -> Completion:
        """Generate one answer to ``messages``, calling ``on_text(piece)`` as text arrives; returns it."""
        settings = settings or GenerationSettings()
        single = GenerationSettings(settings.max_new_tokens, settings.temperature, settings.top_p, 1, settings.seed)
        if on_text is None or not self.backend.streams:
            completion = self.generate([messages], single)[0][0]
            if on_text is not None:
                on_text(completion.text)
            return completion
        from transformers import TextIteratorStreamer

        prompt = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        holder = {}

        def run():
            try:
                holder["tokens"] = self.backend.stream(prompt, single.temperature, single.top_p, single.max_new_tokens,
                                                       single.seed, single.greedy, streamer)
            except BaseException as err:  # surfaced in the caller's thread below
                holder["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="generate-stream", daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                on_text(piece)
        thread.join()
        if "error" in holder:
            raise holder["error"]
        return self._completion(holder["tokens"])

"""The model-adapter interface: everything an algorithm needs from a text-to-image flow model.

An adapter loads a model (hub id or local dir, through diffusers' `from_pretrained`), encodes
prompts, predicts the velocity at (latents, sigma) with or without classifier-free guidance,
decodes latents to [0, 1] images, and names its LoRA targets and sigma schedule. Adding a
model means writing one subclass in one file and registering it in `common/models/__init__.py`;
no algorithm file changes.
"""

from contextlib import contextmanager
from pathlib import Path

import torch


class PromptEmbeds:
    """An adapter's encoded prompts: named batch-first tensors, whatever the model needs (SD3 and
    the toy: token states `hidden` (B, L, D) and a `pooled` vector (B, P); other models: masks,
    ids, source-image latents, ...).

    Algorithm files never name a field: they only index, concatenate, repeat and move the whole
    structure, so a model with a different conditioning changes its adapter and nothing else.
    Fields read as attributes (`embeds.hidden`) inside the adapter that built them.
    """

    def __init__(self, **tensors):
        if not tensors:
            raise ValueError("PromptEmbeds needs at least one tensor")
        sizes = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every conditioning tensor must have the same batch size, got {sizes}")
        self.__dict__["_tensors"] = dict(tensors)

    def __getattr__(self, name):
        try:
            return self.__dict__["_tensors"][name]
        except KeyError:
            raise AttributeError(f"this conditioning has no field {name!r} (it has {sorted(self._tensors)})") from None

    def __setattr__(self, name, value):
        raise AttributeError("PromptEmbeds is immutable; build a new one")

    def fields(self):
        return dict(self._tensors)

    def __len__(self):
        return next(iter(self._tensors.values())).shape[0]

    def _map(self, fn):
        return PromptEmbeds(**{name: fn(t) for name, t in self._tensors.items()})

    def __getitem__(self, index):
        """Rows `index` (an int keeps a batch of one; a slice, list or tensor of indices)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        return self._map(lambda t: t[index.to(t.device) if torch.is_tensor(index) else index])

    def repeat(self, batch):
        """The same (single) embedding repeated `batch` times."""
        if len(self) != 1:
            raise ValueError(f"repeat() expands a batch of one, not {len(self)}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    @staticmethod
    def cat(items):
        items = list(items)
        names = list(items[0]._tensors)
        if any(list(e._tensors) != names for e in items):
            raise ValueError("cannot concatenate conditionings with different fields")
        return PromptEmbeds(**{name: torch.cat([e._tensors[name].to(items[0]._tensors[name].device) for e in items])
                               for name in names})

    def to(self, *args, **kwargs):
        """Move (and/or cast floating tensors): integer ids and bool masks keep their dtype."""
        def move(t):
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            return t.to(device) if device is not None else t
        return self._map(move)


def check_checkpoint(pretrained, required_file="model_index.json", timeout_s=3.0):
    """Raise FileNotFoundError, one line naming the checkpoint and how to pass a local directory,
    unless `pretrained` is a local directory with `required_file`, or a hub id whose
    `required_file` is in the local Hugging Face cache, or (hub not offline) a hub id the hub
    serves within `timeout_s`. Without it a run starts accelerate, then dies in `from_pretrained`
    with a traceback (or hangs on an unreachable hub)."""
    import threading

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    local = "pass a local copy with --pretrained /path/to/dir"
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / required_file).is_file():
            raise FileNotFoundError(f"--pretrained {pretrained}: no {required_file} in that directory "
                                    "(expected a diffusers pipeline saved with save_pretrained)")
        return
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:  # a path, not an org/name hub id
        raise FileNotFoundError(f"--pretrained {pretrained}: no such directory (pass a pipeline directory or a "
                                "hub id org/name)")
    if isinstance(try_to_load_from_cache(pretrained, required_file), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"checkpoint {pretrained} is not in the local Hugging Face cache and the hub is "
                                f"offline (HF_HUB_OFFLINE=1): download it (`hf download {pretrained}`) or {local}")
    outcome = []  # in a thread: a DNS lookup on a machine without network can outlast any HTTP timeout

    def ask_hub():
        try:
            get_hf_file_metadata(hf_hub_url(pretrained, required_file), timeout=timeout_s)
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 - every failure becomes the one-line message below
            outcome.append(error)

    thread = threading.Thread(target=ask_hub, daemon=True)
    thread.start()
    thread.join(timeout_s)
    error = outcome[0] if outcome else TimeoutError(f"no answer within {timeout_s:g} s")
    if isinstance(error, GatedRepoError):
        raise FileNotFoundError(f"checkpoint {pretrained} is gated on the hub: accept its licence at "
                                f"https://huggingface.co/{pretrained} and log in (`hf auth login`), or {local}")
    if isinstance(error, RepositoryNotFoundError):
        raise FileNotFoundError(f"checkpoint {pretrained}: no such model on the hub (or it is private); {local}")
    if isinstance(error, EntryNotFoundError):
        raise FileNotFoundError(f"checkpoint {pretrained}: the hub repository has no {required_file} (not a diffusers "
                                f"pipeline); {local}")
    if error is not None:
        reason = (str(error).splitlines() or [""])[0]
        raise FileNotFoundError(f"checkpoint {pretrained} is not in the local Hugging Face cache and the hub cannot "
                                f"be reached ({type(error).__name__}: {reason}): {local}")


def prompt_texts(prompts):
    """The texts of a batch given as `Prompt` records or plain strings."""
    return [p if isinstance(p, str) else p.text for p in prompts]


def prompt_metadata(prompts):
    """The metadata dicts of a batch given as `Prompt` records or plain strings ({} for a string)."""
    return [{} if isinstance(p, str) else p.metadata for p in prompts]


class ModelAdapter:
    """Base class; subclasses fill in loading, encoding, the transformer call and decoding."""

    name = "base"
    # peft LoRA defaults (the published recipe for the model family)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_rank, lora_alpha = 32, 64
    default_resolution = 512
    # what `--pretrained` defaults to: the published checkpoint (a hub id) or the committed weights
    default_pretrained = None
    # images per evaluation forward; outputs can move by ~1e-6 with the batch composition, so it
    # is fixed per model (the toy card and every in-loop evaluation used 64)
    eval_batch_size = 64

    transformer: torch.nn.Module
    scheduler_config: dict
    device = torch.device("cpu")
    dtype = torch.float32
    # what `transformer_forward` calls: the transformer itself, or its distributed wrapper
    # (set by `wrap`), or a frozen copy while `reference()` is active
    _forward_module = None
    frozen_base = None

    @property
    def forward_module(self):
        return self._forward_module if self._forward_module is not None else self.transformer

    def wrap(self, module):
        """Route forwards through `module` (e.g. the DDP-wrapped transformer)."""
        self._forward_module = module

    def keep_frozen_copy(self):
        """For full fine-tuning: keep a frozen copy of the base transformer for `reference()`."""
        import copy

        self.frozen_base = copy.deepcopy(self.transformer).requires_grad_(False).eval()

    @contextmanager
    def reference(self):
        """Forwards inside this block use the frozen base model: the LoRA adapters disabled
        (on the unwrapped transformer, whatever wraps it), or the frozen copy when fully fine-tuning."""
        if self.frozen_base is not None:
            saved, self._forward_module = self._forward_module, self.frozen_base
            try:
                yield
            finally:
                self._forward_module = saved
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def enable_gradient_checkpointing(self):
        """`--gradient-checkpointing`: the transformer recomputes each block's activations in the
        backward pass (diffusers' own switch); a model without it is refused with the flag's name."""
        if not getattr(self.transformer, "_supports_gradient_checkpointing", False):
            raise ValueError(f"--gradient-checkpointing: the {self.name} model's transformer "
                             f"({type(self.transformer).__name__}) does not support it")
        self.transformer.enable_gradient_checkpointing()

    @classmethod
    def load(cls, pretrained=None, device="cpu", dtype=torch.float32):
        raise NotImplementedError

    @classmethod
    def check_prompts(cls, prompts, source):
        """Raise ValueError (naming the words and `source`) for prompts this model cannot encode;
        called by `validate` before any model loads. Open-vocabulary models accept everything."""

    @classmethod
    def check_pretrained(cls, pretrained):
        """Raise (one line, what to pass) when `pretrained` (None: `default_pretrained`) cannot be
        loaded; called by `validate`. Hub models: `check_checkpoint`."""

    def encode_prompts(self, prompts) -> PromptEmbeds:
        """Conditioning for a batch of prompts: `common.data.Prompt` records (text + metadata;
        editing models read the source image from `metadata["image"]`) or plain strings."""
        raise NotImplementedError

    def negative_embeds(self) -> PromptEmbeds:
        """The empty prompt's embedding (batch 1), encoded once and cached."""
        if getattr(self, "_negative", None) is None:
            self._negative = self.encode_prompts([""])
        return self._negative

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        """The raw model call: velocity for latents (B, ...) at sigma (B,)."""
        raise NotImplementedError

    def predict_velocity(self, latents, sigma, embeds: PromptEmbeds, negative: PromptEmbeds = None, guidance=1.0,
                         detach_uncond=False):
        """Velocity in fp32. With guidance > 1 and a negative, CFG as one batched forward of
        [uncond; cond] (as the published code and diffusers' pipeline do): v_u + w·(v_c - v_u).

        `detach_uncond`: stop the gradient through v_u, so the velocity's gradient is w·∇v_c, as the
        published flow_grpo `compute_log_prob` trains (since 2025-07-15); the value is bitwise the
        same. Only training losses ask for it: it would also cut v_u out of ∂v/∂x (the gmm world's
        exact log-likelihood takes that Jacobian by autograd)."""
        latents = latents.to(self.dtype)
        sigma = sigma.to(latents.device).float().expand(latents.shape[0])
        if guidance > 1 and negative is not None:
            both = self.transformer_forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                                            self.cfg_embeds(embeds, negative))
            uncond, cond = both.float().chunk(2)
            return self.combine_guidance(uncond.detach() if detach_uncond else uncond, cond, guidance)
        return self.transformer_forward(latents, sigma, embeds).float()

    def cfg_embeds(self, embeds: PromptEmbeds, negative: PromptEmbeds) -> PromptEmbeds:
        """[negative; embeds], the conditioning of the batched CFG forward. A rollout (and a training
        pass over one minibatch) calls `predict_velocity` with the same pair at every denoising step,
        so the concatenation is built once per pair and reused (PromptEmbeds is immutable; the cache
        holds the pair itself, so an identity match cannot be a recycled id)."""
        cached = getattr(self, "_cfg_cache", None)
        if cached is not None and cached[0] is embeds and cached[1] is negative:
            return cached[2]
        both = PromptEmbeds.cat([self.pair_negative(embeds, negative), embeds])
        self._cfg_cache = (embeds, negative, both)
        return both

    def pair_negative(self, embeds: PromptEmbeds, negative: PromptEmbeds) -> PromptEmbeds:
        """The negative conditioning row by row with `embeds` (a batch-1 negative is repeated)."""
        return negative.repeat(len(embeds)) if len(negative) == 1 else negative

    def combine_guidance(self, uncond, cond, guidance):
        return uncond + guidance * (cond - uncond)

    def decode(self, latents):
        """Latents -> float images (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def latent_shape(self, batch, resolution=None):
        raise NotImplementedError

    # ---- how a model's samples are pictured, measured and reported (image models: grids)

    def picture(self, path, samples, prompts, scores, max_items=32):
        """Write a picture of decoded samples: a captioned grid of up to `max_items` images."""
        from common.outputs import save_grid

        step = max(1, len(samples) // max_items)
        picked = list(range(0, len(samples), step))[:max_items]
        save_grid(path, samples[picked], [f"{prompts[i].text} [{scores[i]:.2f}]" for i in picked])

    def diagnostics(self, prompts, samples, *, seed, num_steps, guidance, sde=None):
        """Extra evaluation metrics a model can compute exactly (the gmm world: KL to the base);
        `sde` = the run's rollout sampler (sampler, noise_level, num_steps, guidance)."""
        return {}

    def report(self, output_dir, history, reward_fn, prompts, *, seed, num_steps, guidance, images_per_category):
        """Extra end-of-run figures from the run's metric history (the gmm world: the frontier)."""

    def image_seq_len(self, resolution=None):
        """Image tokens seen by the transformer (for dynamically shifted schedules)."""
        return None

    def make_sigmas(self, num_steps, resolution=None):
        # imported here: common.sde pulls in diffusers and scipy (~3 s), which `validate` (adapter
        # classes only) must not wait for
        from common.sde import make_sigmas

        return make_sigmas(self.scheduler_config, num_steps, self.image_seq_len(resolution))


class PipelineAdapter(ModelAdapter):
    """An adapter around a diffusers pipeline (sd3, flux, qwen_image, wan and their editing variants):
    loaded with `pipeline_class`'s own `from_pretrained` (a user's checkpoint and our tests' tiny
    pipelines take the same path), text encoders and transformer in the training dtype, the VAE in
    fp32, every component but the transformer frozen. Subclasses name `pipeline_class` and fill in
    encoding, the transformer call and decoding."""

    pipeline_class = None  # a diffusers pipeline class name, e.g. "FluxPipeline"

    def __init__(self, pipeline, device="cpu", dtype=torch.float32):
        self.pipeline = pipeline
        self.transformer, self.vae = pipeline.transformer, pipeline.vae
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.device, self.dtype = torch.device(device), dtype
        self._negative = None

    @classmethod
    def check_pretrained(cls, pretrained):
        check_checkpoint(pretrained or cls.default_pretrained, "model_index.json")

    @classmethod
    def pipeline_components(cls, pretrained):
        """Components to load differently from the checkpoint's model_index.json (none by default)."""
        return {}

    @classmethod
    def load(cls, pretrained=None, device="cpu", dtype=torch.float32):
        import diffusers  # here, not at import: `validate` imports adapter classes only

        pretrained = pretrained or cls.default_pretrained
        pipeline = getattr(diffusers, cls.pipeline_class).from_pretrained(pretrained, dtype=dtype,
                                                                          **cls.pipeline_components(pretrained))
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        if dtype != torch.float32:
            pipeline.vae.to(dtype=torch.float32)  # the VAE encodes and decodes in fp32
        for name, module in pipeline.components.items():
            if isinstance(module, torch.nn.Module) and name != "transformer":
                module.requires_grad_(False).eval()
        pipeline.transformer.eval()
        return cls(pipeline, device, dtype)

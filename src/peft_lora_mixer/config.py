"""`LoraMixerConfig`: the PEFT config of a mixture of LoRA experts routed token by token."""

from __future__ import annotations

import enum
import math
import textwrap
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .experts.sources import ExpertSource, ExpertSourceLike
from .model_card import CardSummary, card_folder, write_section
from .routing import ROUTING_MODES

ROUTER_INITS = ("random", "experts", "arrow")
_CARD_ROUTER_FIELDS = ("routing", "top_k", "router_temperature")
RSL_BALANCE_SCOPES = ("micro_batch", "global_batch")


class LoraMixerPeftType(str, enum.Enum):
    """Our own PEFT type: PEFT's `PeftType` is a closed enum, so a plugin brings its own member.

    The member's name equals its value, so it hashes and compares like the plain string written to
    `adapter_config.json`, and PEFT's mappings find it under either.
    """

    LORAMIXER = "LORAMIXER"


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number, not a bool or a numeric string (which would fail, or compare, deep inside training)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def documented_fields(cls: type) -> type:
    """Append to the class docstring an `Args:` section in PEFT's format, written from each own field's `help`, type
    and default: the `help` is then the one place a field is documented, and `help(cls)` still shows them all."""
    inherited = {item.name for item in fields(PeftConfig)}
    entries = []
    for item in fields(cls):
        if item.name in inherited:
            continue
        if not item.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{item.name} has no `help`: every field is documented there.")
        kind = "str" if str(item.type).startswith("Literal[") else item.type  # the choices are in the help
        entries.append(f"        {item.name} (`{kind}`, defaults to `{item.default!r}`):")
        entries.append(
            textwrap.fill(
                item.metadata["help"], 120, initial_indent=" " * 12, subsequent_indent=" " * 12, break_on_hyphens=False
            )
        )
    cls.__doc__ = f"{cls.__doc__.rstrip()}\n\n    Args:\n" + "\n".join(entries) + "\n"
    return cls


@documented_fields
@dataclass
class LoraMixerConfig(PeftConfig):
    """Configuration of a LoRA-Mixer adapter (arXiv 2507.00029).

    Each adapted projection (in_features -> out_features) gets `num_experts` LoRA experts and one router, an
    `nn.Linear(in_features, num_experts)` fed the projection's own input; the output is
    `W x + sum_e g_e(x) * s_e * B_e A_e x`, with the gates `g` chosen per token by `routing`. The experts of a
    projection are stored as one `A` of shape (sum_e r_e, in_features) and one `B` of shape
    (out_features, sum_e r_e).

    The `Args:` section below is written from each field's `help` (`documented_fields`): the one place a field is
    documented.
    """

    r: int = field(
        default=8,
        metadata={
            "help": (
                "Rank of each new expert: expert e's `A_e` is (r, in_features), its `B_e` (out_features, r). Experts "
                "from `experts` keep their own ranks."
            )
        },
    )
    lora_alpha: float = field(
        default=8,
        metadata={
            "help": "Scaling numerator, a finite number > 0: each expert's delta is multiplied by `s = lora_alpha / r`."
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout probability on the experts' input, in [0, 1); the router always sees the undropped input."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Scale by `lora_alpha / sqrt(r)` (rank-stabilised LoRA) instead of `lora_alpha / r`."},
    )
    num_experts: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "E, the number of experts on each adapted projection (and the router's output width). None: "
                "`len(experts)` when `experts` is given (another value is an error), else 4."
            )
        },
    )
    top_k: int = field(
        default=2,
        metadata={
            "help": (
                "Experts kept per token by the `topk` and `hard_soft` modes, in [1, num_experts]. With "
                "`top_k == num_experts` every mode is `soft`. `topk` with `top_k=1` weights the kept expert by its "
                "router probability (Switch routing), so that the router trains; `hard_soft` with `top_k=1` gives it "
                "weight 1 with the dense softmax's gradient. Change it after training with `model.set_routing`."
            )
        },
    )
    routing: Literal[ROUTING_MODES] = field(
        default="hard_soft",
        metadata={
            "help": (
                "`'soft'`: softmax over all experts. `'topk'`: the top-k experts by logit (ties to the lower index), "
                "weighted by the softmax of their logits renormalised over them; the router's gradient flows "
                "through the kept experts only (for `top_k=1` see `top_k`). `'hard_soft'`: the paper's "
                "differentiable hard-soft top-k, the forward of `topk` with the gradient of `soft` "
                "(straight-through). With many experts (`num_experts * r` about the projection's width or more) "
                "prefer `topk` for training: `hard_soft`'s router gradient needs every expert's output, `topk` only "
                "the selected experts'."
            )
        },
    )
    router_temperature: float = field(
        default=1.0,
        metadata={"help": "T, finite and > 0: the router's softmax is taken over `logits / T`."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Module names (suffix match) or a regex. None: the default projections of the model's `model_type` "
                "(`peft_lora_mixer.DEFAULT_TARGET_MODULES`), or, with `experts`, every module some expert adapts. "
                "`'all-linear'`: every linear layer but the output head."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or a regex never to adapt, as in PEFT's `LoraConfig`."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Adapt only the layers with these indices, as in PEFT's `LoraConfig`."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Name of the layer list that `layers_to_transform` indexes (e.g. `'layers'`); needs "
                "`layers_to_transform`."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapters to train and save whole (e.g. a new classification head)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: every expert's B starts at zero, so the model's output is unchanged until training. False: B "
                "is random too (for tests)."
            )
        },
    )
    experts: Optional[list[ExpertSourceLike]] = field(
        default=None,
        metadata={
            "help": (
                "Existing PEFT LoRA adapters to use as frozen experts, in router order: Hub ids (`'org/name'`, "
                "`'org/name@revision'`), local folders, or dicts `{'id', 'revision', 'subfolder'}` / `{'path'}`. "
                "Ranks, alphas, rsLoRA and target modules may differ. None: the experts are new LoRAs of rank `r` "
                "(the joint regime). See docs/plug_and_play.md."
            )
        },
    )
    resolved_experts: Optional[list[dict[str, Any]]] = field(
        default=None,
        metadata={
            "help": (
                "Written when the adapter is created from `experts`, not by the user: each expert pinned to the "
                "commit that was resolved, with its rank and scaling per module. Loading uses these pins, never the "
                "moving references in `experts`."
            )
        },
    )
    save_expert_weights: Optional[bool] = field(
        default=None,
        metadata={
            "help": (
                "Whether `save_pretrained` writes the experts' weights next to the routers. None: only when an expert "
                "is a local folder or `trainable_experts` is set; otherwise the checkpoint holds the routers and the "
                "pinned references."
            )
        },
    )
    router_init: Literal[ROUTER_INITS] = field(
        default="random",
        metadata={
            "help": (
                "How the routers of a new mixer over `experts` start. 'random': nn.Linear's initialisation. "
                "'experts': each router row points along its expert's top input direction (top right singular "
                "vector of B_e A_e, signed by the projection's mean input on one forward pass over random token "
                "ids), so the tokens an expert changes most go to it before any training; it did not measure better "
                "than 'random' on the demos (docs/plug_and_play.md), hence not the default. 'arrow': routes as "
                "PEFT's Arrow (top-k of |<v_e, x>|) at 0 steps, then trains as any router; each expert is held "
                "twice, with router rows +v_e and -v_e, since a linear router cannot take |.| (num_experts = 2 x "
                "the experts). A mixer of new experts (no `experts`) and a loaded mixer ignore it."
            )
        },
    )
    trainable_experts: bool = field(
        default=False, metadata={"help": "Train the experts from `experts` together with the routers."}
    )
    allow_pickle_experts: bool = field(
        default=False,
        metadata={
            "help": (
                "Accept experts that only have a pickle checkpoint (`adapter_model.bin`), read with "
                "`torch.load(weights_only=True)`; off by default, since unpickling can run code. Never saved: whoever "
                "loads a mixer decides again (`PeftModel.from_pretrained(..., allow_pickle_experts=True)`)."
            )
        },
    )
    add_routing_loss: bool = field(
        default=True,
        metadata={
            "help": (
                "Build the Routing Specialization Loss (RSL) in training forwards and send its gradient to the "
                "routers, whatever loss is backpropagated; `outputs.loss` stays the task loss (docs/training.md)."
            )
        },
    )
    rsl_balance_weight: float = field(
        default=0.01,
        metadata={"help": "alpha, the weight of the balance term `alpha * E * sum_i pbar_i * fbar_i`."},
    )
    rsl_entropy_weight: float = field(
        default=0.01,
        metadata={"help": "lambda, the weight of the mean per-token routing entropy (its start value when adaptive)."},
    )
    rsl_entropy_sign: int = field(
        default=1,
        metadata={
            "help": (
                "The RSL adds `sign * lambda * H`, H the mean per-token routing entropy, and training minimises it. "
                "With 1 and `lambda > 0` training lowers H: each token's choice sharpens (input-aware routing, what "
                "the paper's text asks for). -1 raises H (the paper's equation read literally, `- lambda * H` "
                "minimised)."
            )
        },
    )
    rsl_entropy_target: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Target mean per-token entropy in nats, in [0, log(num_experts)]. When set, lambda adapts after every "
                "training forward: `lambda <- max(0, lambda + rsl_entropy_adapt_rate * sign * (H - target))`."
            )
        },
    )
    rsl_entropy_adapt_rate: float = field(
        default=0.01, metadata={"help": "Step size of the adaptive lambda (used with `rsl_entropy_target`)."}
    )
    rsl_preservation_weight: float = field(
        default=0.0,
        metadata={
            "help": (
                "beta, the weight of `beta * sum_e ||theta_e - theta_e(0)||^2` over the experts that stay trainable "
                "(theta_e(0): their weights at `set_trainable`, or else at the first training forward)."
            )
        },
    )
    rsl_balance_scope: Literal[RSL_BALANCE_SCOPES] = field(
        default="micro_batch",
        metadata={
            "help": (
                "The tokens the balance term's statistics (pbar, fbar) are taken over: `'micro_batch'` (each forward "
                "on each process) or `'global_batch'`, all-reduced over the data-parallel processes (the default "
                "process group), so N processes give the RSL of one process on the whole batch."
            )
        },
    )

    router_label_weight: float = field(
        default=2.0,
        metadata={
            "help": (
                "Weight of the router label loss, a finite number >= 0; used only when a training batch carries "
                "`router_labels` (each sample's expert index, -100 for none; `ExpertIdsCollator(key='router_labels')` "
                "makes them from a column), and 0 refuses them. Every router then adds this weight times the "
                "cross-entropy from its probabilities to the sample's expert, averaged over its labelled tokens, to "
                "the loss its gradient comes from (with `add_routing_loss=False`, this term alone); the weight is per "
                "router, so a deep model's routers are pulled as hard as a shallow one's. For router data labelled "
                "by task (plug-and-play over task LoRAs): routers trained from the task loss alone can stall on wrong "
                "experts (docs/plug_and_play.md#routers-from-task-labels)."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LoraMixerPeftType.LORAMIXER
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.num_experts is None:
            self.num_experts = len(self.experts) * self.copies_per_expert if self.experts else 4
        self._validate()

    @property
    def copies_per_expert(self) -> int:
        """How many router slots each of `experts` takes: 2 with router_init='arrow' (a +v_e and a -v_e row)."""
        return 2 if self.router_init == "arrow" and self.experts else 1

    @property
    def num_distinct_experts(self) -> int:
        """The experts a router label can name: the router slots over `copies_per_expert`."""
        return self.num_experts // self.copies_per_expert

    def _validate(self) -> None:
        """Refuse values that cannot work, before any model is touched."""
        if self.experts is not None:
            if not isinstance(self.experts, (list, tuple)) or not self.experts:
                raise ValueError(f"`experts` must be a non-empty list of adapter sources, got {self.experts!r}.")
            if self.num_experts != len(self.experts) * self.copies_per_expert:
                raise ValueError(
                    f"`num_experts`={self.num_experts} but {len(self.experts)} `experts` were given"
                    f"{' (held twice each by router_init=arrow)' if self.copies_per_expert == 2 else ''}; leave "
                    "`num_experts` unset, it follows the list."
                )
            for source in self.experts:
                ExpertSource.parse(source)  # a malformed source fails here, not when the model is built
            if self.trainable_experts and self.save_expert_weights is False:
                raise ValueError(
                    "`trainable_experts=True` with `save_expert_weights=False` would save the routers with the "
                    "original experts' references and lose the trained experts; leave `save_expert_weights` unset."
                )
        if not _is_integer(self.r) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if not _is_integer(self.num_experts) or self.num_experts <= 0:
            raise ValueError(f"`num_experts` must be a positive integer, got {self.num_experts!r}.")
        if not _is_integer(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"`top_k` must be an integer between 1 and num_experts={self.num_experts}, got {self.top_k!r}."
            )
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"Unknown `router_init` {self.router_init!r}; choose one of {', '.join(ROUTER_INITS)}.")
        if self.copies_per_expert == 2 and self.top_k > len(self.experts):
            raise ValueError(
                f"router_init='arrow' keeps the top_k of the {len(self.experts)} experts, as Arrow does; `top_k` must "
                f"be at most {len(self.experts)}, got {self.top_k}."
            )
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"Unknown `routing` {self.routing!r}; choose one of {', '.join(ROUTING_MODES)}.")
        # written as `not 0 < value < inf` so that NaN, which fails every comparison, is refused too
        if not _is_number(self.lora_alpha) or not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"`lora_alpha` must be a finite number > 0, got {self.lora_alpha!r}.")
        if not _is_number(self.router_temperature) or not 0 < self.router_temperature < math.inf:
            raise ValueError(
                f"`router_temperature` must be a finite number > 0, got {self.router_temperature!r} (at inf the "
                "router's gradient is exactly 0)."
            )
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be a number in [0, 1), got {self.lora_dropout!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only applies together with `layers_to_transform`.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be combined with a regex `target_modules`.")
        self._validate_routing_loss()

    def _validate_routing_loss(self) -> None:
        """The RSL and label-loss weights are non-negative finite numbers; the sign picks the direction instead."""
        for name in (
            "rsl_balance_weight",
            "rsl_entropy_weight",
            "rsl_entropy_adapt_rate",
            "rsl_preservation_weight",
            "router_label_weight",
        ):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < math.inf:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if self.rsl_entropy_sign not in (1, -1) or isinstance(self.rsl_entropy_sign, bool):
            raise ValueError(
                f"`rsl_entropy_sign` must be 1 (minimise per-token entropy) or -1 (maximise it), "
                f"got {self.rsl_entropy_sign!r}."
            )
        if self.rsl_balance_scope not in RSL_BALANCE_SCOPES:
            raise ValueError(
                f"Unknown `rsl_balance_scope` {self.rsl_balance_scope!r}; choose one of {', '.join(RSL_BALANCE_SCOPES)}."
            )
        target = self.rsl_entropy_target
        if target is not None and not (_is_number(target) and 0 <= target <= math.log(self.num_experts)):
            raise ValueError(
                f"`rsl_entropy_target` must lie in [0, log(num_experts)] = [0, {math.log(self.num_experts):.4f}] "
                f"nats, got {target!r}."
            )

    @property
    def expert_sources(self) -> list[ExpertSource]:
        """The parsed `experts`, in router order."""
        return [ExpertSource.parse(source) for source in self.experts or ()]

    @property
    def stores_expert_weights(self) -> bool:
        """Whether the checkpoint carries the experts' weights (else only the routers and the pinned references)."""
        if not self.experts:
            return True
        if self.save_expert_weights is not None:
            return self.save_expert_weights
        return self.trainable_experts or not all(source.is_hub for source in self.expert_sources)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict, without `allow_pickle_experts`: trusting pickle files is the loading user's decision."""
        config = super().to_dict()
        del config["allow_pickle_experts"]
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's config file; when `PeftModel.save_pretrained` saves it (it passes `auto_mapping_dict`), also this
        adapter's section of the model card PEFT has just written."""
        saved_by_peft_model = "auto_mapping_dict" in kwargs
        super().save_pretrained(save_directory, **kwargs)
        card = card_folder(save_directory) if saved_by_peft_model else None
        if card is not None:
            folder, adapter_name = card
            write_section(folder, adapter_name, self.card_summary())

    def card_summary(self) -> CardSummary:
        """What the model card says about this adapter: the router settings, any routing-loss settings (`rsl_*`),
        and the experts it pins."""
        settings = {
            item.name: getattr(self, item.name)
            for item in fields(self)
            if item.name in _CARD_ROUTER_FIELDS or item.name.startswith("rsl_")
        }
        return CardSummary(
            num_experts=self.num_experts,
            settings=settings,
            experts=tuple(self.resolved_experts or ()),
            trainable_experts=self.trainable_experts,
            stores_expert_weights=self.stores_expert_weights,
        )

    @property
    def expert_scaling(self) -> float:
        """The factor s applied to every expert's B A x."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

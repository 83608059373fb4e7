"""Adversarial robustness of a text classifier: ``slimtune eval RUN --attack pgd|substitution``.

* ``pgd``: embedding-space PGD as in FreeLB and the robust-ticket code (ruizheng20/robust_ticket,
  ``search_ticket.py``, the adversarial loop): L2 norm; the initial perturbation is uniform in
  [-1, 1] on the non-padding tokens, scaled by ``init_radius / sqrt(n_tokens * hidden)`` per
  example; each step adds ``step_size * g / ||g||`` (the per-example L2 norm of the gradient of the
  cross-entropy) and projects back onto the L2 ball of radius ``radius`` per example. The model is
  called with ``inputs_embeds = E[input_ids] + delta``. Deviations: the official code attacks
  during training with an optional (default unlimited) bound; here the bound ``radius`` is the
  measured budget, the initial point is projected onto it too (so radius 0 is the clean model), the
  gradient and the perturbation are zeroed on padding positions explicitly, an example counts
  as broken if any iterate (the initial point, every step and the final point) misclassifies it,
  and ``steps`` counts updates (the official ``adv_steps`` counts forwards: 5 forwards, 4 updates).
* ``substitution``: a word-substitution attack in the style of TextFooler / BERT-Attack with what
  works offline: the substitutes of a word are its nearest neighbours (cosine) among the whole-word
  tokens of the model's own input-embedding matrix (no special tokens, no subword pieces, no
  stop-words of a small fixed list, not the word itself; punctuation around a word is kept); the importance of a word is the drop of
  the true-class probability when it is deleted; words are replaced greedily in importance order
  (the first candidate, in neighbour order, that flips the prediction, else the one that lowers the
  true-class probability most) until the prediction flips or ``max_change`` of the words changed.
  Deviations: no sentence-encoder similarity or POS filter (neither is available offline);
  importance is computed only for the words that can be substituted (fewer queries); for sentence
  pairs only the first text is attacked.

Only originally correctly classified examples are attacked; the attacked examples are the first
``examples`` of the test split (in order), and the PGD start is drawn from a generator seeded by
``seed``, so a run is reproducible.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError

ATTACKS = ("pgd", "substitution")

# A small fixed English stop-word list: never attacked, never used as a substitute (TextFooler skips
# stop-words too; theirs is longer).
STOP_WORDS = frozenset(
    "a an the and or but if of at by for with about to from in on off up down out over under again "
    "then once here there when where why how all any both each few more most other some such no nor "
    "not only own same so than too very can will just is are was were be been being have has had do "
    "does did i me my we our you your he him his she her it its they them their this that these those "
    "am s t don should now".split()
)


#: The settings each attack reads (the others do not apply to it); ``examples`` applies to both.
ATTACK_FIELDS = {"pgd": ("radius", "steps", "step_size", "init_radius", "seed"), "substitution": ("max_change", "candidates")}


def cli_flag(field: str) -> str:
    """The ``slimtune eval`` flag of an :class:`AttackConfig` field (``step_size`` -> ``--attack-step-size``)."""
    return "--attack" if field == "name" else "--attack-" + field.replace("_", "-")


@dataclass(frozen=True)
class AttackConfig:
    name: str
    radius: float = 1.0  # pgd: the L2 budget per example
    steps: int = 5  # pgd: the official adv_steps default in the robust-ticket scripts
    step_size: float = 0.03  # pgd: official adv_lr
    init_radius: float = 0.05  # pgd: official adv_init_mag
    max_change: float = 0.2  # substitution: fraction of the words that may change
    candidates: int = 20  # substitution: nearest neighbours tried per word
    examples: int | None = None  # attack only the first N test examples
    seed: int = 0

    def check(self, flag: Callable[[str], str] = cli_flag) -> AttackConfig:
        """Self, or a one-line SlimtuneError naming the bad field as ``flag(field)`` says (the
        command line's flags by default; a recipe names its fields)."""
        if self.name not in ATTACKS:
            raise SlimtuneError(f"{flag('name')}: unknown attack '{self.name}'; valid: {', '.join(ATTACKS)}")
        for field in ("radius", "step_size", "init_radius"):
            value = getattr(self, field)
            if not math.isfinite(value) or value < 0:
                raise SlimtuneError(f"{flag(field)}: {value} must be a finite number >= 0")
        if self.steps < 0:
            raise SlimtuneError(f"{flag('steps')}: {self.steps} must be >= 0")
        if not 0.0 <= self.max_change <= 1.0:
            raise SlimtuneError(f"{flag('max_change')}: {self.max_change} must be in [0, 1]")
        if self.candidates < 0:
            raise SlimtuneError(f"{flag('candidates')}: {self.candidates} must be >= 0")
        if self.examples is not None and self.examples < 1:
            raise SlimtuneError(f"{flag('examples')}: {self.examples} must be >= 1")
        return self

    @property
    def key(self) -> str:
        """A stable short name: the attack and the settings that differ from the defaults
        (``pgd``, ``pgd:radius=0.1``, ``substitution:max_change=0.5:examples=200``); the key of
        a report's result and of a bench column."""
        parts = [self.name]
        for field in (*ATTACK_FIELDS.get(self.name, ()), "examples"):
            value = getattr(self, field)
            if value != AttackConfig.__dataclass_fields__[field].default:
                parts.append(f"{field}={value:g}" if isinstance(value, float) else f"{field}={value}")
        return ":".join(parts)

    def describe(self) -> str:
        """For the report card: ``pgd, L2 0.1`` (steps and step size when not the defaults),
        ``substitution, 20% of words`` (candidates when not the default)."""
        default = AttackConfig(self.name)
        if self.name == "pgd":
            text = f"pgd, L2 {self.radius:g}"
            if (self.steps, self.step_size, self.init_radius) != (default.steps, default.step_size, default.init_radius):
                text += f", {self.steps} x {self.step_size:g} from {self.init_radius:g}"
            return text
        text = f"substitution, {self.max_change:.0%} of words"
        return text + (f", {self.candidates} candidates" if self.candidates != default.candidates else "")


# -- PGD -------------------------------------------------------------------------------------------

def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each example's perturbation onto the L2 ball of ``radius`` (those inside stay)."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = torch.clamp(radius / norms, max=1.0)
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


def perturbation_start(embeds: torch.Tensor, attention_mask: torch.Tensor, init_radius: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """FreeLB's L2 start: uniform in [-1, 1] on the non-padding tokens, scaled by
    ``init_radius / sqrt(n_tokens * hidden)`` per example (zero when ``init_radius`` is 0)."""
    if init_radius <= 0:
        return torch.zeros_like(embeds)
    mask = attention_mask.unsqueeze(-1).to(embeds.dtype)
    lengths = attention_mask.sum(1).to(embeds.dtype)
    delta = (torch.rand(embeds.shape, generator=generator) * 2 - 1).to(embeds) * mask
    return delta * (init_radius / torch.sqrt(lengths * embeds.shape[-1])).view(-1, 1, 1)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor, step_size: float) -> torch.Tensor:
    """One L2 ascent step: ``delta + step_size * g / ||g||`` (per-example norm), zero on padding."""
    mask = attention_mask.unsqueeze(-1).to(delta.dtype)
    grad = grad * mask
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, *([1] * (grad.dim() - 1)))
    return (delta.detach() + step_size * grad / norms) * mask


def pgd_perturb(model: nn.Module, batch: dict[str, torch.Tensor], cfg: AttackConfig, generator: torch.Generator):
    """PGD on the word embeddings of one labelled batch: ``(delta, clean_correct, robust_correct)``,
    ``delta`` the final perturbation (B, L, H), zero on padding, L2 norm <= ``cfg.radius`` per example."""
    labels = batch["labels"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
        clean = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1) == labels
    delta = project_l2(perturbation_start(embeds, batch["attention_mask"], cfg.init_radius, generator), cfg.radius)
    robust = clean.clone()
    for step in range(cfg.steps + 1):
        delta.requires_grad_(True)
        logits = model(inputs_embeds=embeds + delta, **extra).logits
        robust &= logits.argmax(-1) == labels
        if step == cfg.steps:
            break
        (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), labels), delta)
        delta = project_l2(ascent_step(delta, grad, batch["attention_mask"], cfg.step_size), cfg.radius)
    return delta.detach(), clean, robust


def check_inputs_embeds(model: nn.Module, batch: dict[str, torch.Tensor] | None = None, where: str = "--attack pgd") -> None:
    """Refuse (one line) a model PGD cannot attack: one that cannot be called with
    ``inputs_embeds`` (soft prompts take that path themselves), or whose logits carry no gradient
    back to them (ladder side tuning runs the backbone without gradients and detaches its
    embeddings). ``batch`` defaults to two tokens of id 1."""
    if batch is None:
        batch = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    was_training = model.training
    model.eval()
    try:
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, **extra).logits
        (grad,) = torch.autograd.grad(logits.float().sum(), embeds, allow_unused=True) if logits.requires_grad else (None,)
    except (SlimtuneError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise SlimtuneError(f"{where}: this run's model cannot take inputs_embeds ({reason})") from None
    finally:
        model.train(was_training)
    if grad is None:
        raise SlimtuneError(f"{where}: this run's logits carry no gradient back to the input embeddings (its method runs the backbone "
                            "without gradients, as ladder side tuning does), so a gradient attack cannot run; use substitution")


def pgd_eval(model: nn.Module, batches, cfg: AttackConfig) -> dict[str, float]:
    """Clean accuracy and accuracy under PGD over labelled ``batches``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    n = clean_total = robust_total = 0
    try:
        for i, batch in enumerate(batches):
            if i == 0:
                check_inputs_embeds(model, batch)
            _, clean, robust = pgd_perturb(model, batch, cfg, generator)
            n += len(clean)
            clean_total += int(clean.sum())
            robust_total += int(robust.sum())
    finally:
        model.train(was_training)
    return {"clean_accuracy": clean_total / max(n, 1), "attacked_accuracy": robust_total / max(n, 1),
            "attack_success_rate": (clean_total - robust_total) / max(clean_total, 1), "examples": n}


# -- word substitution -----------------------------------------------------------------------------

class Substituter:
    """Nearest whole-word neighbours in the model's input-embedding matrix, and model queries on texts."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, batch_size: int = 64):
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.queries = 0
        special = set(getattr(tokenizer, "all_special_ids", []))
        vocab = tokenizer.get_vocab()
        # whole words only: alphabetic tokens (WordPiece "##" pieces and byte-level "Ġ"/"▁" pieces are not)
        self.word_ids = {tok: i for tok, i in vocab.items() if tok.isalpha() and i not in special and tok.lower() not in STOP_WORDS}
        if not self.word_ids:
            raise SlimtuneError("--attack substitution: the tokenizer has no whole-word tokens to substitute (WordPiece vocabularies do)")
        self.ids = torch.tensor(sorted(self.word_ids.values()))
        self.tokens = {i: tok for tok, i in self.word_ids.items()}
        weight = model.get_input_embeddings().weight.detach().float()
        self.normed = F.normalize(weight[self.ids], dim=1)
        self.weight = weight
        self._cache: dict[str, list[str]] = {}

    def token_of(self, word: str) -> str | None:
        """The vocabulary token a word is (punctuation around it aside), if it is one whole
        substitutable word (else None)."""
        core = word.strip(string.punctuation)
        for form in (core, core.lower()):
            if form in self.word_ids:
                return form
        return None

    @staticmethod
    def replace(word: str, substitute: str) -> str:
        """``word`` with its core replaced, the punctuation around it kept ("great," -> "awful,")."""
        core = word.strip(string.punctuation)
        start = word.index(core)
        return word[:start] + substitute + word[start + len(core) :]

    def neighbours(self, token: str, k: int) -> list[str]:
        if token not in self._cache:
            query = F.normalize(self.weight[self.word_ids[token]], dim=0)
            sims = self.normed @ query
            order = torch.argsort(sims, descending=True, stable=True)[: k + 1]
            self._cache[token] = [self.tokens[int(self.ids[j])] for j in order if self.tokens[int(self.ids[j])] != token][:k]
        return self._cache[token][:k]

    @torch.no_grad()
    def probs(self, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s : s + self.batch_size], pairs[s : s + self.batch_size] if pairs else None,
                                 truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            out.append(self.model(**enc).logits.float().softmax(-1))
        self.queries += len(texts)
        return torch.cat(out)


def substitute_one(sub: Substituter, text: str, label: int, cfg: AttackConfig, pair: str | None = None) -> dict:
    """Attack one correctly classified text: ``{"success", "changed", "words", "text"}``."""
    words = text.split()
    budget = int(math.floor(cfg.max_change * len(words) + 1e-9))
    if budget == 0 or cfg.candidates == 0:
        return {"success": False, "changed": 0, "words": len(words), "text": text}
    pairs = (lambda n: [pair] * n) if pair is not None else (lambda n: None)
    positions = [i for i, w in enumerate(words) if sub.token_of(w) is not None]
    base = float(sub.probs([" ".join(words)], pairs(1))[0, label])
    importance = []
    if positions:
        deleted = [" ".join(words[:i] + words[i + 1 :]) for i in positions]
        p = sub.probs(deleted, pairs(len(deleted)))[:, label]
        importance = [base - float(p[j]) for j in range(len(positions))]
    order = [positions[j] for j in sorted(range(len(positions)), key=lambda j: (-importance[j], positions[j]))]
    current, changed = base, 0
    for i in order:
        cands = sub.neighbours(sub.token_of(words[i]), cfg.candidates)
        if not cands:
            continue
        trials = [" ".join(words[:i] + [sub.replace(words[i], c)] + words[i + 1 :]) for c in cands]
        probs = sub.probs(trials, pairs(len(trials)))
        flipped = [j for j in range(len(cands)) if int(probs[j].argmax()) != label]
        if flipped:
            words[i] = sub.replace(words[i], cands[flipped[0]])
            return {"success": True, "changed": changed + 1, "words": len(words), "text": " ".join(words)}
        best = int(torch.argmin(probs[:, label]))
        if float(probs[best, label]) < current:
            words[i], current, changed = sub.replace(words[i], cands[best]), float(probs[best, label]), changed + 1
            if changed >= budget:
                break
    return {"success": False, "changed": changed, "words": len(words), "text": " ".join(words)}


def substitution_eval(model: nn.Module, tokenizer, split, max_length: int, cfg: AttackConfig, batch_size: int = 64) -> dict:
    """Clean accuracy, accuracy under the substitution attack, its success rate (over the correctly
    classified examples), the mean fraction of words changed (over successful attacks) and the model
    queries per attacked example, over the text rows of ``split`` (``text`` [, ``text_pair``], ``label``)."""
    was_training = model.training
    model.eval()
    try:
        sub = Substituter(model, tokenizer, max_length, batch_size)
        texts = [" ".join(t.split()) for t in split["text"]]
        pairs = list(split["text_pair"]) if "text_pair" in split.column_names else None
        labels = list(split["label"])
        clean_pred = sub.probs(texts, pairs).argmax(-1).tolist()
        sub.queries = 0  # queries are counted per attacked example, from its own clean query on
        correct = [i for i, (p, y) in enumerate(zip(clean_pred, labels)) if p == y]
        results = [substitute_one(sub, texts[i], labels[i], cfg, pairs[i] if pairs else None) for i in correct]
    finally:
        model.train(was_training)
    n, successes = len(texts), [r for r in results if r["success"]]
    return {
        "clean_accuracy": len(correct) / max(n, 1),
        "attacked_accuracy": (len(correct) - len(successes)) / max(n, 1),
        "attack_success_rate": len(successes) / max(len(correct), 1),
        "words_changed": sum(r["changed"] / r["words"] for r in successes) / max(len(successes), 1),
        "queries_per_example": sub.queries / max(len(correct), 1),
        "examples": n,
    }


# -- a run's test split ----------------------------------------------------------------------------

def check_attackable(objective: str, task, where: str = "--attack") -> None:
    """Only text classification can be attacked: refused (one line) otherwise."""
    test = task.splits["test"]
    if objective != "classification" or "text" not in test.column_names:
        raise SlimtuneError(f"{where}: only text classification runs can be attacked (this run: {objective} on {task.name})")
    if getattr(task, "members", None):
        raise SlimtuneError(f"{where}: a multi-task run ({task.name}) cannot be attacked yet; attack a single-task run")


def attack_task(model: nn.Module, tokenizer, task, cfg: AttackConfig, *, objective: str, max_length: int, batch_size: int) -> dict:
    """``cfg`` on the first ``cfg.examples`` test examples of ``task`` (all by default), tokenised
    as the run's recipe says: ``{"key", "config", clean_accuracy, attacked_accuracy, ...}``, the
    entry a report's ``robustness.attacks`` holds (``slimtune eval --attack`` and the recipe's
    ``robustness`` section both go through here)."""
    from slimtune.zoo.batches import eval_batches, pad_id_of, rows_batch, tokenize_split

    check_attackable(objective, task)
    test = task.splits["test"]
    test = test.select(range(len(test) if cfg.examples is None else min(cfg.examples, len(test))))
    if cfg.name == "pgd":
        rows = tokenize_split(test, tokenizer, max_length, objective).to_list()
        batches = (rows_batch(rows, idx, pad_id_of(tokenizer), objective) for idx in eval_batches(len(rows), batch_size))
        result = pgd_eval(model, batches, cfg)
    else:
        result = substitution_eval(model, tokenizer, test, max_length, cfg, batch_size)
    return {"key": cfg.key, "config": asdict(cfg), **result}

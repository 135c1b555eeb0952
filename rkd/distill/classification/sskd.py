"""SSKDNet: self-supervised knowledge distillation for scene classification.

Y. Zhao, J. Liu, J. Yang, Z. Wu, "Remote Sensing Image Scene Classification via Self-Supervised
Learning and Knowledge Distillation", Remote Sensing 14(19):4813, 2022, DOI 10.3390/rs14194813.
No public code. Only the paper's abstract was available to this project, so the
equation labels below (S1)-(S5) are this module's own, written from the abstract's description;
where the abstract leaves a choice open, the choice made here is stated next to it.

The student trains with a branch attached to its lowest backbone level ``F_0`` (B, C_0, H, W),
both optimised together in one stage, no pre-training:

* **Background masking** (the paper's masking, the default ``mask_mode: background``). ``F_0`` is
  cut into ``P = (H/p)(W/p)`` patches of ``p x p`` cells; exactly ``k = floor(mask_ratio * P + 1/2)``
  of them per sample are replaced by a learned mask token: the ``k`` patches of lowest attention
  energy ``mean_c F_L^2`` of the deepest map (the least salient ones, i.e. the background; the
  abstract names no saliency measure, this is the activation-based attention of Zagoruyko &
  Komodakis, "Paying More Attention to Attention", ICLR 2017). ``mask_mode: random`` (an option,
  not the paper's) draws them uniformly.
* **Patch shuffling.** The patches are then permuted by a random per-sample permutation ``pi``.
* **Restoration (S1).** The restorer ``g`` gets the masked, shuffled map and nothing else: it must
  infer where each patch belongs, so ``pi`` (and ``pi^-1``) never reach it; its output is compared
  with ``F_0`` as it stands::

      L_restore = mean_{b,c,h,w} (g(pi(M(F_0))) - sg(F_0))^2                             (S1)

  ``g`` refines every cell from its (shuffled) neighbourhood with convs, then places patches:
  each target slot ``j`` attends over the shuffled patches ``t_i`` with
  ``A = softmax_i(q(e_j) . k(t_i) / sqrt(d))`` (``e_j`` a fixed sinusoidal code of the slot's
  normalised row and column, so any map size works) and receives ``sum_i A_ji t_i``.

  ``sg`` (stop-gradient): the backbone's own maps are the supervision signal, a fixed target for
  the step, so the backbone cannot lower the loss by shrinking its features. The branch's input
  is *not* detached: joint optimisation lets the restoration and branch losses shape ``F_0``.
* **Branch classifier (S2).** From the restored map, strided conv stages mirror the backbone's
  levels (``b_0 .. b_{L-1}``, same channels and strides); the branch predicts ``z_b`` from them
  and learns from the labels: ``L_branch = CE(z_b, y)``.
* **Dynamic feature fusion (S3).** With ``fusion: true`` the branch's levels are pooled
  (``u_l = GAP(b_l)``), projected to a common width (``P_l``) and summed with per-sample weights
  ``w = softmax(W_g [u_0; ...; u_{L-1}] + c)`` (learned, input-dependent)::

      u = sum_l w_l * P_l u_l,   z_b = W_b u + c_b                                       (S3)

  With ``fusion: false``, ``z_b`` comes from the deepest level alone (``u = GAP(b_{L-1})``).
* **Self-distillation (S4).** The branch's softened predictions ("dark knowledge") teach the
  backbone's logits ``z_s``; the branch side is detached, so this term trains the backbone only::

      L_distill = T^2 * mean_b KL(softmax(sg(z_b)/T) || softmax(z_s/T))                   (S4)

* **Teacher-guided branch (S6, rkd's, not the paper's; ``teacher_weight > 0``).** The branch also
  learns the teacher's softened predictions, so the knowledge (S4) hands to the backbone is the
  teacher's as well as the labels' and the restoration's; the teacher side is detached::

      L_teacher = T^2 * mean_b KL(softmax(sg(z_t)/T) || softmax(z_b/T))                   (S6)

* **Total (S5):** ``w_r * L_restore + w_b * L_branch + w_d * r(e) * L_distill + w_t * L_teacher``
  (the student's own cross-entropy is the training loop's ``gt.cls``). Terms: ``restore``,
  ``branch_cls``, ``distill`` and, with ``w_t > 0``, ``teacher``.
  ``r(e) = min(e / warmup_epochs, 1)`` is rkd's, not the paper's: the branch starts from scratch, and
  its early predictions are noise the backbone should not imitate (applied after the loss balance).
  ``branch_grad: detached`` keeps (S1) and (S2) off the backbone (an ablation: measured far worse).

The branch is a set of KD parts: it trains with the student and is never exported. With
``teacher_weight: 0`` a teacher, when one is given, is ignored (self-distillation, the paper's method).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkd.distill.base import KDComponent, Param, linear_ramp, register
from rkd.distill.functional import mse, softmax_kd
from rkd.outputs import ClassifierInfo, ClassifierOutput

PATCH_SIZES = (1, 2, 4)


# ----------------------------------------------------------------------------------------------
# Patch masking and shuffling (pure functions, vectorised over samples and patches).


def masked_count(num_patches: int, ratio: float) -> int:
    """Patches hidden per sample: ``floor(ratio * P + 1/2)`` (round half up, unlike Python's round).

    >>> masked_count(16, 0.3), masked_count(4, 0.125), masked_count(64, 0.0)
    (5, 1, 0)
    """
    return int(math.floor(ratio * num_patches + 0.5))


def to_patches(x: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W) -> (B, P, C, p, p)``, patches in row-major order of the patch grid."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} feature map cannot be cut into {patch}x{patch} patches")
    gh, gw = h // patch, w // patch
    return x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, patch, patch)


def from_patches(patches: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`to_patches` for a ``height x width`` map.

    >>> x = torch.arange(2 * 3 * 4 * 6.0).reshape(2, 3, 4, 6)
    >>> torch.equal(from_patches(to_patches(x, 2), 4, 6), x)
    True
    """
    b, _, c, p, _ = patches.shape
    gh, gw = height // p, width // p
    return patches.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def random_permutations(batch: int, num_patches: int, device: torch.device | str = "cpu") -> Tensor:
    """``(B, P)`` long: an independent uniform permutation of ``0..P-1`` per sample."""
    return torch.rand(batch, num_patches, device=device).argsort(dim=1)


def shuffle_patches(x: Tensor, perm: Tensor, patch: int) -> Tensor:
    """Move patches: patch ``i`` of the output is patch ``perm[b, i]`` of the input.

    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> shuffle_patches(x, torch.tensor([[3, 2, 1, 0]]), 1).flatten().tolist()
    [3.0, 2.0, 1.0, 0.0]
    """
    patches = to_patches(x, patch)
    index = perm[:, :, None, None, None].expand_as(patches)
    return from_patches(patches.gather(1, index), x.shape[-2], x.shape[-1])


def unshuffle_patches(x: Tensor, perm: Tensor, patch: int) -> Tensor:
    """Inverse of :func:`shuffle_patches` with the same ``perm`` (puts each patch back in place)."""
    patches = to_patches(x, patch)
    index = perm[:, :, None, None, None].expand_as(patches)
    restored = torch.empty_like(patches).scatter_(1, index, patches)
    return from_patches(restored, x.shape[-2], x.shape[-1])


def lowest_score_mask(scores: Tensor, count: int) -> Tensor:
    """``(B, P)`` bool: True at the ``count`` lowest scores of each row (ties by index).

    >>> lowest_score_mask(torch.tensor([[0.3, 0.1, 0.2, 0.9]]), 2).tolist()
    [[False, True, True, False]]
    """
    rank = scores.argsort(dim=1, stable=True).argsort(dim=1)
    return rank < count


def patch_attention(feature: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, P)`` attention energy ``mean_c F^2`` of ``feature`` resampled to the patch grid."""
    energy = feature.detach().pow(2).mean(dim=1, keepdim=True)
    # antialias: where the patch grid is coarser than the map, average instead of sampling a few cells
    return F.interpolate(energy, size=grid, mode="bilinear", align_corners=False, antialias=True).flatten(1)


def mask_patches(x: Tensor, mask: Tensor, patch: int, fill: Tensor) -> Tensor:
    """Replace the masked patches (``mask`` ``(B, P)`` bool) of ``x`` by ``fill`` ``(C,)``."""
    b, c, h, w = x.shape
    cells = mask.reshape(b, 1, h // patch, w // patch)
    cells = cells.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return torch.where(cells, fill.view(1, c, 1, 1).to(x.dtype), x)


# ----------------------------------------------------------------------------------------------
# Losses (pure functions).


def restore_loss(restored: Tensor, target: Tensor) -> Tensor:
    """(S1) mean squared error to the detached backbone map."""
    return mse(restored, target.detach())


def branch_cls_loss(branch_logits: Tensor, labels: Tensor) -> Tensor:
    """(S2) cross-entropy of the branch's predictions."""
    return F.cross_entropy(branch_logits, labels)


def self_distill_loss(student_logits: Tensor, branch_logits: Tensor, temperature: float) -> Tensor:
    """(S4) ``T^2 * mean_b KL(softmax(sg(z_b)/T) || softmax(z_s/T))``; the branch side is detached."""
    return softmax_kd(student_logits, branch_logits.detach(), temperature)


def teacher_branch_loss(branch_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """(S6) ``T^2 * mean_b KL(softmax(sg(z_t)/T) || softmax(z_b/T))``: the teacher teaches the branch."""
    return softmax_kd(branch_logits, teacher_logits.detach(), temperature)


def fusion_weights(gate_logits: Tensor) -> Tensor:
    """(S3) per-sample level weights ``softmax`` over the levels: ``(B, L)``, rows summing to 1."""
    return gate_logits.softmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Learnable parts.


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def slot_codes(rows: int, cols: int, freqs: int, device=None) -> Tensor:
    """``(rows*cols, 4*freqs)`` sinusoidal codes ``sin/cos(pi k r)`` of normalised slot centres, row-major.

    >>> slot_codes(2, 3, 2).shape
    torch.Size([6, 8])
    """
    ys = (torch.arange(rows, device=device) + 0.5) / rows
    xs = (torch.arange(cols, device=device) + 0.5) / cols
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    k = torch.arange(1, freqs + 1, device=device)
    angles = torch.stack([xs.flatten(), ys.flatten()], -1)[:, :, None] * math.pi * k  # (P, 2, freqs)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(1)


class Restorer(nn.Module):
    """``g`` of (S1), from the masked, shuffled map alone: two 3x3 conv blocks (the second dilated,
    for a wider view) and a 1x1 projection (linear, as features may be signed) refine each cell,
    then every target slot gathers patches by attention from its position code (module doc)."""

    def __init__(self, channels: int, patch: int, width: int = 32, freqs: int = 4) -> None:
        super().__init__()
        self.patch, self.freqs = patch, freqs
        self.body = nn.Sequential(_conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels, dilation=2))
        self.out = nn.Conv2d(channels, channels, 1)
        self.key = nn.Linear(channels * patch * patch, width)
        self.query = nn.Linear(4 * freqs, width)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch
        tokens = to_patches(self.out(self.body(x)), p)  # (B, P, C, p, p), in shuffled order
        flat = tokens.flatten(2)
        queries = self.query(slot_codes(h // p, w // p, self.freqs, x.device).to(x.dtype))  # (P, d)
        attn = torch.softmax(queries @ self.key(flat).transpose(1, 2) / math.sqrt(queries.shape[-1]), dim=-1)
        return from_patches((attn @ flat).view_as(tokens), h, w)  # slot j <- sum_i A_ji t_i


class DynamicFusion(nn.Module):
    """(S3): pooled levels, projected to ``width`` and summed with input-dependent softmax weights."""

    def __init__(self, level_channels: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(c, width) for c in level_channels)
        self.gate = nn.Linear(sum(level_channels), len(level_channels))

    def forward(self, pooled: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(fused (B, width), weights (B, L))``."""
        weights = fusion_weights(self.gate(torch.cat(pooled, dim=1)))
        projected = torch.stack([proj(u) for proj, u in zip(self.project, pooled)], dim=1)  # (B, L, width)
        return (weights.unsqueeze(-1) * projected).sum(dim=1), weights


class SSKDBranch(nn.Module):
    """The branch: restorer, strided stages mirroring the backbone's levels, fusion, classifier."""

    def __init__(self, info: ClassifierInfo, fusion: bool, patch: int) -> None:
        super().__init__()
        chans, strides = info.level_channels, info.strides
        self.mask_token = nn.Parameter(torch.zeros(chans[0]))
        self.restorer = Restorer(chans[0], patch)
        self.stages = nn.ModuleList(
            _conv_bn_relu(chans[i - 1], chans[i], stride=strides[i] // strides[i - 1]) for i in range(1, len(chans))
        )
        self.fusion = DynamicFusion(chans, chans[-1]) if fusion else None
        self.fc = nn.Linear(chans[-1], info.num_classes)

    def classify(self, restored: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(branch logits, fusion weights or None)`` of a restored level-0 map."""
        maps = [restored]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        if self.fusion is None:
            return self.fc(maps[-1].mean(dim=(2, 3))), None
        fused, weights = self.fusion([m.mean(dim=(2, 3)) for m in maps])
        return self.fc(fused), weights


@register("sskd", task="classification")
class SSKD(KDComponent):
    """SSKDNet self-distillation (see module doc); terms ``restore``, ``branch_cls``, ``distill``."""

    needs_teacher = False
    # Under kd_balance auto, SSKD pulls 0.1x the task loss by default (AID, 8 seeds, docs/benchmarks.md): its
    # branch, trained from scratch beside the student, cost an 8-epoch student 8 points of top-1 at 1x, 0.017
    # at 0.3x (below the student alone on 7 of 8 seeds); at 0.1x it ties (+0.003), above 0.3x on all 8 seeds.
    balance_share = 0.1
    params = {
        "mask_ratio": Param("float", 0.3, 0.0, 0.75, help="share of level-0 patches hidden by the mask token"),
        "patch": Param("choice", 2, choices=PATCH_SIZES, help="side of a masked/shuffled patch, in level-0 cells"),
        "mask_mode": Param(
            "choice",
            "background",
            choices=("random", "background"),
            help="which patches are hidden: the least salient (the paper's background masking) or random ones",
        ),
        "temperature": Param("float", 4.0, 1.0, 8.0, help="softening temperature T of (S4)"),
        "restore_weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="w_r of (S5)"),
        "branch_weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="w_b of (S5)"),
        "distill_weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="w_d of (S5)"),
        "fusion": Param("bool", True, help="dynamic multi-level fusion (S3) in the branch"),
        "branch_grad": Param(
            "choice",
            "joint",
            choices=("joint", "detached"),
            help="whether the restoration and branch losses also train the backbone (joint, the paper's "
            "one-stage optimisation) or only the branch (detached: the backbone learns from (S4) alone)",
        ),
        "teacher_weight": Param(
            "float",
            0.0,
            0.0,
            10.0,
            published=0.0,
            help="w_t of (S6): the branch also learns the teacher's softened predictions (rkd's; 0 = "
            "self-distillation alone, the paper's)",
        ),
        "warmup_epochs": Param(
            "float",
            4.0,
            0.0,
            8.0,
            published=0.0,
            help="(S4) ramps up as min(epoch / E, 1) while the branch, trained from scratch, learns; 0 = none "
            "(the paper's one stage has none; rkd's 4 measured on AID, docs/benchmarks.md)",
        ),
    }

    @classmethod
    def check_models(cls, student: ClassifierInfo, teacher: ClassifierInfo | None, hparams: dict[str, Any]) -> None:
        strides = student.strides
        if hparams["teacher_weight"] > 0 and teacher is None:
            raise ValueError(
                "KD method 'sskd': teacher_weight > 0 distils a teacher's predictions into the branch, but no "
                "teacher was given; train or name a teacher, or set sskd.teacher_weight: 0"
            )
        if any(strides[i] % strides[i - 1] for i in range(1, len(strides))):
            raise ValueError(f"KD method 'sskd' needs each backbone stride to divide the next, got {list(strides)}")
        # Inputs are multiples of 32 px, so level 0 has a multiple of 32 / stride_0 cells per side.
        if 32 % (strides[0] * hparams["patch"]):
            raise ValueError(
                f"KD method 'sskd': patch {hparams['patch']} does not divide the level-0 map of every input size "
                f"(stride {strides[0]}, inputs a multiple of 32 px); use a patch dividing {32 // strides[0]}"
            )

    def __init__(self, student: ClassifierInfo, teacher: ClassifierInfo | None, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        # (S6) reads the teacher's logits; without it the teacher's forward pass is skipped
        self.needs_teacher = self.hparams["teacher_weight"] > 0
        self.branch = SSKDBranch(student, self.hparams["fusion"], self.hparams["patch"])

    def corrupt(self, low: Tensor, deepest: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(masked and shuffled map, patch mask (B, P), permutation (B, P))`` of a level-0 map."""
        p, (b, _, h, w) = self.hparams["patch"], low.shape
        if h % p or w % p:
            raise ValueError(f"sskd: the {h}x{w} level-0 map cannot be cut into {p}x{p} patches")
        grid = (h // p, w // p)
        num = grid[0] * grid[1]
        if self.hparams["mask_mode"] == "background":
            scores = patch_attention(deepest, grid)
        else:
            scores = torch.rand(b, num, device=low.device)
        mask = lowest_score_mask(scores, masked_count(num, self.hparams["mask_ratio"]))
        perm = random_permutations(b, num, low.device)
        return shuffle_patches(mask_patches(low, mask, p, self.branch.mask_token), perm, p), mask, perm

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        hp = self.hparams
        low = student.features[0]
        if hp["branch_grad"] == "detached":
            low = low.detach()
        corrupted, _, _ = self.corrupt(low, student.features[-1])
        restored = self.branch.restorer(corrupted)  # (S1): the permutation stays out of reach
        branch_logits, _ = self.branch.classify(restored)
        terms = {
            "restore": hp["restore_weight"] * restore_loss(restored, low),
            "branch_cls": hp["branch_weight"] * branch_cls_loss(branch_logits, labels),
            "distill": hp["distill_weight"] * self_distill_loss(student.logits, branch_logits, hp["temperature"]),
        }
        if self.needs_teacher:  # the distiller refuses a batch without the teacher's output
            terms["teacher"] = hp["teacher_weight"] * teacher_branch_loss(
                branch_logits, teacher.logits, hp["temperature"]
            )
        return terms

    def ramps(self, epoch: float) -> dict[str, float]:
        return {"distill": linear_ramp(epoch, self.hparams["warmup_epochs"])}

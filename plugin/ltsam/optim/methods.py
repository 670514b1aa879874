"""The SAM-family methods: each is the list of groups it hands to the engine (algorithms.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

from ltsam.counts import CountsLike, load_class_counts
from ltsam.optim.engine import Group, SAMFamily, check_targets, out_of_range
from ltsam.optim.protocol import refuse_positional_base


class SAM(SAMFamily):
    """SAM (Foret et al., 2021); ``adaptive=True`` gives ASAM (Kwon et al., 2021), whose rho is ~10x larger."""

    needs_targets = False

    def __init__(self, params, rho: float = 0.05, adaptive: bool = False, **kwargs) -> None:
        refuse_positional_base(type(self).__name__, "rho", rho)
        super().__init__(params, adaptive=adaptive, **kwargs)
        self.add_radii(rho=rho)

    def groups(self, targets: Tensor | None, batch_size: int, device: torch.device) -> list[Group]:
        return [Group(None, 1.0 / batch_size, "rho")]  # a float weight: every sample, no device read


class ClassAware(SAMFamily):
    """A method that reads per-class training counts (a list or a JSON file)."""

    def __init__(self, params, class_counts: CountsLike | None = None, **kwargs) -> None:
        refuse_positional_base(type(self).__name__, "class_counts", class_counts)
        if class_counts is None:
            raise ValueError(
                f"{type(self).__name__} needs class_counts: a list of per-class training counts or a JSON "
                "file of them (`ltsam.counts.save_class_counts`), e.g. --opt-kwargs class_counts=counts.json"
            )
        super().__init__(params, **kwargs)
        self.class_counts = load_class_counts(class_counts)
        self.num_classes = len(self.class_counts)

    def class_table(self, values: list[float] | Tensor, targets: Tensor) -> Tensor:
        """Per-sample value of a per-class table (``values[c]`` for a sample of class c), for ``groups()``.

        Labels outside the table are refused by the engine's one host read of the step (indexing with them is
        clamped meanwhile, so no device assert fires first). The values come in the engine's weight dtype
        (float32, float64 for a float64 model)."""
        bad = check_targets(targets, self.num_classes)
        self.defer_check(bad, lambda: out_of_range(targets, self.num_classes))
        table = torch.as_tensor(values, dtype=self.weight_dtype, device=targets.device)
        return table[targets.clamp(0, self.num_classes - 1)]

    def tail_mask(self, eta: float, targets: Tensor) -> Tensor:
        """1.0 for samples of a tail class (fewer than ``eta`` training samples), else 0.0."""
        return self.class_table([float(c < eta) for c in self.class_counts], targets)


class ImbSAM(ClassAware):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail classes only, head trained at w.

    G = grad L_head(w) + tail_weight * grad L_tail(w + eps_tail); both losses are sums over their samples
    divided by the full batch size, and ``tail_weight`` defaults to 2 as in the official code.
    """

    perturb_eps = 1e-16

    def __init__(self, params, class_counts: CountsLike | None = None, rho: float = 0.05, eta: float = 20,
                 tail_weight: float = 2.0, **kwargs) -> None:
        super().__init__(params, class_counts=class_counts, **kwargs)
        self.add_radii(rho=rho)
        self.eta, self.tail_weight = eta, tail_weight
        self.defaults.update(eta=eta, tail_weight=tail_weight)

    def groups(self, targets: Tensor | None, batch_size: int, device: torch.device) -> list[Group]:
        tail = self.tail_mask(self.eta, targets) / batch_size
        return [Group(1.0 / batch_size - tail, self.tail_weight * tail, "rho")]


class SSESAM(ClassAware):
    """SSE-SAM (AAAI 2025): head and tail each perturbed with their own radius.

    Stage 1 perturbs both groups; after ``gamma`` of the ``epochs`` the head radius drops to 0 (stage 2),
    which equals ImbSAM with tail weight 1. The tail is the classes with fewer than ``eta`` samples.
    """

    perturb_eps = 1e-16

    def __init__(self, params, class_counts: CountsLike | None = None, head_rho: float = 0.05,
                 tail_rho: float = 0.1, gamma: float = 0.7, eta: float = 100, epochs: int | None = None,
                 **kwargs) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"SSESAM gamma={gamma} is the fraction of training in stage 1; it must lie in [0, 1]")
        super().__init__(params, class_counts=class_counts, epochs=epochs, **kwargs)
        self.add_radii(head_rho=head_rho, tail_rho=tail_rho)
        self.gamma, self.eta = gamma, eta
        self.defaults.update(gamma=gamma, eta=eta)

    @property
    def stage(self) -> int:
        """1 while the head is perturbed, 2 once ``epoch >= gamma * epochs`` (the official switch)."""
        if self.epochs is None:
            raise RuntimeError(
                "SSESAM needs epochs=<total training epochs> to know when stage 2 starts "
                "(pass it to the constructor or --opt-kwargs epochs=N, or set opt.epochs)"
            )
        return 2 if self.epoch >= self.gamma * self.epochs else 1

    def groups(self, targets: Tensor | None, batch_size: int, device: torch.device) -> list[Group]:
        tail = self.tail_mask(self.eta, targets) / batch_size
        head_rho = "head_rho" if self.stage == 1 else 0.0
        return [Group(None, 1.0 / batch_size - tail, head_rho), Group(None, tail, "tail_rho")]


class FocalSAM(ClassAware):
    """Focal-SAM (ICML 2025): per-sample sharpness weight c_y = lam * (1 - pi_y) ** gamma.

    G = grad[L - L_c](w) + grad L_c(w + eps) with L_c = sum_j c_{y_j} l_j / B and eps along grad L_c.
    Defaults are the paper's CIFAR-10-LT setting (rho 0.2, gamma 3.0, lam 0.5).
    """

    def __init__(self, params, class_counts: CountsLike | None = None, rho: float = 0.2, gamma: float = 3.0,
                 lam: float = 0.5, **kwargs) -> None:
        super().__init__(params, class_counts=class_counts, **kwargs)
        self.add_radii(rho=rho)
        self.gamma, self.lam = gamma, lam
        self.defaults.update(gamma=gamma, lam=lam)
        total = sum(self.class_counts)
        self.sharpness_weights = [lam * (1.0 - n / total) ** gamma for n in self.class_counts]

    def groups(self, targets: Tensor | None, batch_size: int, device: torch.device) -> list[Group]:
        c = self.class_table(self.sharpness_weights, targets) / batch_size
        return [Group(1.0 / batch_size - c, c, "rho")]


"""Compress a CIFAR-10 ResNet-20 with your own model, your own data loaders and the ``cnn`` search space.

What it shows
    - a model defined in your own code: ResNet-20 for CIFAR-10 (He et al., "Deep
      Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3 stem
      with 16 channels, then 3 stages of 3 basic blocks with 16, 32 and 64
      channels, the option-A identity shortcut, global average pooling, a 10-way
      linear classifier; about 0.27 M parameters);
    - a :class:`autorank.ClassificationTask` on plain ``DataLoader``\\ s (top-1
      accuracy on the validation loader, fine-tuning with cross-entropy);
    - the ``cnn`` search space: its layer rules (the stem and layers under 4,096
      parameters, i.e. the first stage's 16-channel convolutions and the
      classifier, stay dense; they are about a third of ResNet-20's FLOPs, hence
      the default budget of ``60%flops``) and its kept-fraction grid, with its
      method list narrowed by ``--methods`` (default ``svd,spatial-svd,tucker2``,
      the fast, one-shot factorizations; ``--methods all`` searches every method
      of the space, CP, TT, BTD and DCF included, which costs several times longer
      because CP-ALS is fitted anew for every rank tried);
    - exporting the best model and loading it back with
      ``autorank.load(path, model=ResNet20())`` (a model class defined in a
      script is not importable by name, so the architecture is passed in).

Data
    ``--data DIR``: torchvision's CIFAR-10, downloaded into DIR on first use (needs
    internet and ``pip install torchvision``). ``--synthetic``: seeded tensors of
    CIFAR's shape (3x32x32, 10 classes; each class a smooth random pattern plus
    noise), so that everything except the download runs offline.

    There are no pretrained CIFAR weights offline, so the model is first trained
    for ``--pretrain-steps`` steps (default 100; a few hundred steps give a usable
    but far from converged model on real CIFAR-10; pass ``--weights FILE``, a
    ``state_dict`` saved with ``torch.save``, to start from your own). The trained
    weights are kept in ``--out`` and reused when the command is run again, so that
    the search resumes on the same model.

Run
    python examples/cifar10_resnet20.py --synthetic                 # 30 trials (about 3 minutes on 2 CPU cores)
    python examples/cifar10_resnet20.py --data ~/data/cifar10       # real CIFAR-10 (download once)
    python examples/cifar10_resnet20.py --synthetic --small         # tiny run for tests (under a minute)

FLOPs count one multiply-add as one FLOP (fvcore's convention). ``--out`` (default
``runs/cifar10_resnet20``) holds the trained weights (``resnet20-pretrained.pt``),
the search's run directory (``search/``: study, trials, ``front.json``, plots) and
the exported best model (``best.pt``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autorank
from autorank.search import SearchSpace, search

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# ---------------------------------------------------------------------- the model
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; option-A shortcut (stride-2 subsampling, zero-padded channels)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images (He et al. 2016): depth 6n+2 with n=3."""

    def __init__(self, num_classes: int = 10, n: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------- data
def synthetic_cifar(n_train: int, n_val: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-shaped tensors (N, 3, 32, 32), 10 classes, seeded.

    Each class is a smooth random pattern; an image is its class's pattern, shifted
    by a few pixels, plus a weaker pattern of another class and noise. The
    distractor is sometimes nearly as strong as the class pattern, so that even a
    good model is not always right and compression shows in the accuracy.
    """
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(10, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear", align_corners=False)
    templates = templates / templates.std()

    def shifted(classes: torch.Tensor) -> torch.Tensor:
        shift = torch.randint(-3, 4, (len(classes), 2), generator=g)  # small translations, as in real images
        return torch.stack([torch.roll(templates[c], (int(s[0]), int(s[1])), dims=(1, 2)) for c, s in zip(classes.tolist(), shift)])

    def draw(n: int) -> TensorDataset:
        y = torch.randint(0, 10, (n,), generator=g)
        other = (y + torch.randint(1, 10, (n,), generator=g)) % 10
        a = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)   # class pattern strength
        b = 0.6 * torch.rand(n, 1, 1, 1, generator=g)         # distractor strength
        x = a * shifted(y) + b * shifted(other) + 0.7 * torch.randn(n, 3, 32, 32, generator=g)
        return TensorDataset(x, y)

    return draw(n_train), draw(n_val)


def torchvision_cifar(root: Path, n_train: int | None, n_val: int | None):
    """CIFAR-10 from torchvision (downloaded into ``root`` once), normalised, random crops and flips for training."""
    try:
        import torchvision
        from torchvision import transforms
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        sys.exit(f"--data needs torchvision ({type(exc).__name__}: {exc}).\n"
                 "Install it with:  pip install torchvision\n"
                 "or run offline with:  python examples/cifar10_resnet20.py --synthetic")
    norm = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train = torchvision.datasets.CIFAR10(str(root), train=True, download=True, transform=transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    val = torchvision.datasets.CIFAR10(str(root), train=False, download=True,
                                       transform=transforms.Compose([transforms.ToTensor(), norm]))
    if n_train is not None:
        train = torch.utils.data.Subset(train, range(n_train))
    if n_val is not None:
        val = torch.utils.data.Subset(val, range(n_val))
    return train, val


# ---------------------------------------------------------------------- training before the search
def pretrain(model: nn.Module, loader: DataLoader, steps: int, lr: float = 2e-3, seed: int = 0) -> None:
    """``steps`` Adam steps with a one-cycle schedule (no pretrained CIFAR weights are available offline)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    torch.manual_seed(seed)
    model.train()
    step, t0 = 0, time.perf_counter()
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"  pretrain step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if step >= steps:
                break
    recalibrate_batchnorm(model, loader)
    model.eval()


def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, batches: int = 16) -> None:
    """Recompute BatchNorm running statistics as plain averages over a few batches.

    After a short training run the running averages (momentum 0.1) still remember
    their initial values; evaluation then sees wrong statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x)
    for bn in bns:
        bn.momentum = 0.1


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def print_front(result) -> None:
    print(f"front ({len(result.front)} members; budget {result.budget}; original accuracy {result.base_score:.4f}; "
          "FLOPs count one multiply-add as one FLOP):")
    print(f"  {'trial':>5}  {'acc':>6}  {'0-shot':>6}  {'tuned':>5}  {'FLOPs':>6}  {'params':>6}  plan")
    for m in result.front:
        print(f"  {m.trial:>5}  {m.score:6.4f}  {m.zero_shot_score:6.4f}  {'yes' if m.finetuned else 'no':>5}  "
              f"{m.flops_ratio:6.1%}  {m.params_ratio:6.1%}  {m.summary}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, metavar="DIR", help="CIFAR-10 via torchvision, downloaded into DIR")
    src.add_argument("--synthetic", action="store_true", help="seeded CIFAR-shaped tensors instead of the dataset (offline)")
    p.add_argument("--budget", default="60%flops", help="hardware budget (default 60%%flops)")
    p.add_argument("--trials", type=int, default=30, help="zero-shot trials (default 30)")
    p.add_argument("--finetune", type=int, default=2, help="how many promising plans to fine-tune (default 2)")
    p.add_argument("--finetune-steps", type=int, default=50, help="fine-tuning steps per plan (default 50)")
    p.add_argument("--methods", default="svd,spatial-svd,tucker2",
                   help="comma-separated methods of the cnn space to search, or 'all' (default svd,spatial-svd,tucker2)")
    p.add_argument("--pretrain-steps", type=int, default=100, help="training steps (batch 32) before the search (default 100)")
    p.add_argument("--weights", type=Path, help="a ResNet20 state_dict to start from instead of pretraining")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all; synthetic 4096)")
    p.add_argument("--n-val", type=int, default=None,
                   help="validation images scored per trial (default 128, to stay quick; CIFAR-10's test set has 10,000)")
    p.add_argument("--out", type=Path, default=Path("runs/cifar10_resnet20"),
                   help="output directory: trained weights, the search's run directory (search/), best.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true",
                   help="tiny run for tests: 5 trials of svd and spatial-svd, 20 pretraining steps, "
                        "1 plan fine-tuned for 5 steps, 64 images scored")
    args = p.parse_args(argv)
    sensitivity_points = 2
    n_val = args.n_val or 128
    if args.small:
        args.trials, args.finetune, args.finetune_steps, args.pretrain_steps = 5, 1, 5, 20
        args.methods = "svd,spatial-svd" if args.methods == p.get_default("methods") else args.methods
        n_val = args.n_val or 64

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.synthetic:
        train_set, val_set = synthetic_cifar(args.n_train or (512 if args.small else 4096), n_val, seed=args.seed)
    else:
        train_set, val_set = torchvision_cifar(args.data, args.n_train, n_val)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=gen)
    val_loader = DataLoader(val_set, batch_size=256, shuffle=False)

    # ---- a trained model to compress (kept in --out, so that a second run resumes the search on the same one)
    args.out.mkdir(parents=True, exist_ok=True)
    trained = args.out / "resnet20-pretrained.pt"
    model = ResNet20()
    if args.weights is not None:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    elif trained.exists():
        model.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True))
        print(f"reusing the trained weights in {trained}")
    else:
        print(f"training ResNet-20 for {args.pretrain_steps} steps (no pretrained CIFAR weights offline)")
        pretrain(model, train_loader, args.pretrain_steps, seed=args.seed)
        torch.save(model.state_dict(), trained)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-20: {n_params} parameters, validation accuracy {accuracy(model, val_loader):.4f} "
          f"on {len(val_set)} {'synthetic ' if args.synthetic else ''}images")

    # ---- the search space: the built-in cnn space, its method list narrowed (a dict is a space too)
    space = SearchSpace.load("cnn")
    if args.methods != "all":
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in space.methods]
        if unknown:
            sys.exit(f"--methods: {', '.join(unknown)} not in the cnn space ({', '.join(space.methods[1:])})")
        space = {**space.to_dict(), "methods": ["none", *wanted]}
    print(f"search space: cnn, methods {', '.join(space['methods'][1:] if isinstance(space, dict) else space.methods[1:])}")

    # ---- the search
    task = autorank.ClassificationTask(train_loader, val_loader, lr=1e-3, name="cifar10" + ("-synthetic" if args.synthetic else ""))
    result = search(
        model, task, budget=args.budget, space=space, trials=args.trials, out=args.out / "search",
        finetune=args.finetune, finetune_steps=args.finetune_steps, seed=args.seed,
        sensitivity_points=sensitivity_points, measure_latency=False,
    )
    print(f"search: {len(result.trials)} trials, run directory {result.run_dir} ({time.perf_counter() - t0:.1f} s so far)")
    print_front(result)

    best = result.pick("best")
    print(f"best: trial {best.trial}, accuracy {best.score:.4f} (original {result.base_score:.4f}), "
          f"FLOPs {best.flops_ratio:.1%}, params {best.params_ratio:.1%}")
    for name, lp in best.plan.layers.items():
        print(f"  {name:16s} {lp.method:12s} rank {lp.rank}")

    # ---- export and load back: the file records no importable spec for a script's class, so pass the architecture
    example = task.example_inputs()
    pt_path = args.out / "best.pt"
    rep = result.export(best, pt_path, format="pt", force=True, example_inputs=example)
    loaded = autorank.load(pt_path, model=ResNet20())
    with torch.no_grad():
        same = torch.equal(loaded(example), result.build(best)(example))
    print(f"exported {rep.path} ({rep.bytes} bytes); loaded == front member: {same}; "
          f"loaded accuracy {accuracy(loaded, val_loader):.4f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

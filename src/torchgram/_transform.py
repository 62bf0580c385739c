"""The public transforms: ``gramian_of``, ``gramian``, ``vjp_and_gramian`` and ``jd_grad``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from torchgram._distributed import Sharded, check_group, shard
from torchgram._factors import DEFAULT_CHUNK_BYTES
from torchgram._guards import restore
from torchgram._linearised import Linearised, Options
from torchgram._memo import Probes, remembered
from torchgram._pytree import InDims, Inputs, normalize_argnums, split_inputs
from torchgram._run import linearise

Tensor = torch.Tensor


def _options(
    fn: Callable[..., Any],
    caller: str,
    batch_dim: Any,
    has_aux: Any,
    check_samples: Any,
    max_chunk_bytes: Any = DEFAULT_CHUNK_BYTES,
    group: Any = None,
) -> Options:
    if not callable(fn):
        raise TypeError(f"{caller}: fn must be callable, got {type(fn).__name__}.")
    if batch_dim is not None and (not isinstance(batch_dim, int) or isinstance(batch_dim, bool)):
        raise TypeError(
            f"{caller}: batch_dim must be an int (the output dimension that indexes samples) or "
            f"None, got {batch_dim!r}."
        )
    if not isinstance(has_aux, bool):
        raise TypeError(f"{caller}: has_aux must be a bool, got {has_aux!r}.")
    if (
        not isinstance(max_chunk_bytes, int)
        or isinstance(max_chunk_bytes, bool)
        or max_chunk_bytes <= 0
    ):
        raise ValueError(
            f"{caller}: max_chunk_bytes must be a positive int (the largest intermediate, in "
            f"bytes, built at once), got {max_chunk_bytes!r}. Pass e.g. 2**26 (64 MiB)."
        )
    check_group(group, batch_dim, caller)
    return Options(batch_dim, has_aux, bool(check_samples), caller, max_chunk_bytes, group)


def _linearise(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: tuple[int, ...],
    in_dims: InDims,
    options: Options,
    probes: Probes | None = None,
) -> tuple[Inputs, Linearised | Sharded]:
    """Split the arguments and run fn under the tape: what every transform starts with (on this
    rank's shard of the batch when ``options.group`` is set).

    ``probes``: the transform's memory of earlier probes (see ``torchgram._memo``).
    """
    if options.batch_dim is None:  # samples are not separated: in_dims play no part
        in_dims = None

    def local() -> tuple[Inputs, Linearised]:
        inputs = split_inputs(args, argnums, in_dims, options.caller)
        return inputs, linearise(fn, inputs, options, probes)

    return local() if options.group is None else shard(local, options)


def gramian_of(
    fn: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    batch_dim: int | None = None,
    in_dims: InDims = 0,
    has_aux: bool = False,
    check_samples: bool = True,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    group: Any = None,
) -> Callable[..., Any]:
    """Transform ``fn`` into a function that returns the Gramian of its Jacobian.

    For ``out = fn(*args)`` of shape ``S`` and the parameters ``args[argnums]`` (any pytree of
    floating-point tensors, each tensor once), the returned function gives the generalized
    Gramian of shape ``S + S[::-1]``:

        G[s, reversed(s')] = <d out[s] / d params, d out[s'] / d params>

    so a ``[B]`` output gives ``[B, B]``, ``[B, K]`` gives ``[B, K, K, B]`` and a 0-D output a 0-D
    Gramian (the squared gradient norm). [`torchgram.flatten`][torchgram.flatten] turns it
    into ``[m, m]``.

    The Gramian is computed without forming per-sample gradients: ``fn`` runs under a tape of
    parameter uses, one reverse pass gives the output cotangents of every use, and per-op rules
    (ghost norms for linear maps, a generic per-op rule otherwise) sum into the Gramian.

    Args:
        fn: ``fn(*args) -> out`` (``-> (out, aux)`` with ``has_aux``). Every leaf of the
            parameters is a variable; everything else fn uses is a constant.
        argnums: Position (or positions) of the parameter arguments.
        batch_dim: The output dimension that indexes independent samples, or None. It is a
            promise that sample ``i`` of the output depends only on sample ``i`` of the batched
            inputs; the result is the full Gramian either way, ``batch_dim`` only makes it
            cheaper. fn then runs under ``torch.func.vmap`` and sees a batch of one sample.
        in_dims: Where the samples lie in fn's positional arguments, with ``torch.func.vmap``'s
            convention: an int for every tensor of every argument, or a tuple with one entry per
            positional argument (an int, None for an argument without samples, or a pytree
            prefix of the argument); the entry of the parameters is ignored.
        has_aux: fn returns ``(out, aux)``; aux is returned last. With ``batch_dim``, aux tensors
            come back stacked on the samples (at ``batch_dim`` when fn keeps a batch of one
            there, else on a new leading dimension).
        check_samples: The first call's checks, on each signature of the arguments (their
            structure, and the shape, dtype and device of every tensor). With ``batch_dim``:
            fn run sample by sample must equal fn run on the whole batch at once, both from
            the same state of the random generators (ops that mix samples would otherwise give
            a wrong Gramian). Where a call runs fn more than once, its outputs must agree (fn
            must not change state that it reads). Raises if not. Later calls on a signature
            run fn once and check nothing; the eager forms remember the signatures they saw
            per fn, as long as fn lives. False skips the checks (for ops whose results differ
            beyond rounding between a batch and its samples: low precision, or random draws
            laid out by the batch).
        max_chunk_bytes: The largest intermediate, in bytes, that the per-op rules build at
            once (blocks of ``[B, T, B, T]`` ghost products, per-sample gradients, unfolded
            convolution patches); larger work is split into chunks. Bounds peak memory, not
            the result. ``vjp_and_gramian`` and ``jd_grad`` also keep up to this many bytes of
            the per-sample gradients the Gramian built, for the direction. Default 24 MiB.
        group: A ``torch.distributed`` process group over which the samples along
            ``batch_dim`` are spread (each rank passes its own shard; shards may differ in
            size), or None for one process. The result is then the Gramian of the global batch
            (the shards joined in rank order), the same on every rank; every rank of the group
            must make the same call. See the Scaling out page.

    Returns:
        A function with fn's positional arguments returning the Gramian (and aux).

    Examples:
        >>> import torch, torchgram
        >>> def losses(w, x, y):
        ...     return (x @ w - y) ** 2                     # [B]
        >>> w, x, y = torch.randn(3), torch.randn(5, 3), torch.randn(5)
        >>> G = torchgram.gramian_of(losses, batch_dim=0)(w, x, y)
        >>> G.shape
        torch.Size([5, 5])
        >>> J = torch.func.jacrev(losses)(w, x, y)          # [B, 3]
        >>> torch.allclose(G, J @ J.T, atol=1e-4)
        True
    """
    return _gramian_transform(
        fn, argnums, batch_dim, in_dims, has_aux, check_samples, max_chunk_bytes, Probes(), group
    )


def _gramian_transform(
    fn: Callable[..., Any],
    argnums: int | tuple[int, ...],
    batch_dim: int | None,
    in_dims: InDims,
    has_aux: bool,
    check_samples: bool,
    max_chunk_bytes: int,
    probes: Probes,
    group: Any = None,
    name: str = "gramian_of",
) -> Callable[..., Any]:
    """``gramian_of``'s function, with its memory (``name``: the public function called)."""
    caller = f"{name}(fn, batch_dim={batch_dim})"
    options = _options(fn, caller, batch_dim, has_aux, check_samples, max_chunk_bytes, group)
    numbers = normalize_argnums(argnums, caller)

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        _, run = _linearise(fn, args, numbers, in_dims, options, probes)
        G = run.gramian(release=True)  # no vjp follows
        return (G, run.aux) if options.has_aux else G

    return wrapper


def gramian(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    batch_dim: int | None = None,
    in_dims: InDims = 0,
    has_aux: bool = False,
    check_samples: bool = True,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    group: Any = None,
) -> Any:
    """The Gramian of the Jacobian of ``fn(params, *args)`` with respect to ``params``.

    Eager form of [`gramian_of`][torchgram.gramian_of]
    (``gramian_of(fn, argnums=0, ...)(params, *args)``), like ``torch.func.vjp`` is to
    ``torch.func.grad``. Called in a loop with the same ``fn``, it runs ``fn`` as often as a
    transform built once (it remembers what it learned of ``fn`` while ``fn`` lives).

    Args:
        fn: ``fn(params, *args) -> out`` (``-> (out, aux)`` with ``has_aux``), as for
            [`gramian_of`][torchgram.gramian_of].
        params: The parameters, any pytree of floating-point tensors.
        *args: fn's other positional arguments.
        batch_dim: The output dimension that indexes independent samples, or None; see
            [`gramian_of`][torchgram.gramian_of].
        in_dims: Where the samples lie in fn's positional arguments, as for
            [`gramian_of`][torchgram.gramian_of].
        has_aux: fn returns ``(out, aux)``; aux is returned last.
        check_samples: The first call's checks, as for [`gramian_of`][torchgram.gramian_of].
        max_chunk_bytes: The largest intermediate the rules build at once, as for
            [`gramian_of`][torchgram.gramian_of].
        group: As for [`gramian_of`][torchgram.gramian_of].

    Returns:
        The generalized Gramian ``S + S[::-1]`` of the output of shape ``S`` (and aux).

    Examples:
        >>> import torch, torchgram
        >>> model = torch.nn.Linear(4, 1)
        >>> params = dict(model.named_parameters())
        >>> def losses(params, x):
        ...     return torch.func.functional_call(model, params, (x,)).squeeze(-1)
        >>> torchgram.gramian(losses, params, torch.randn(8, 4), batch_dim=0).shape
        torch.Size([8, 8])
    """
    transform = _gramian_transform(
        fn, 0, batch_dim, in_dims, has_aux, check_samples, max_chunk_bytes, remembered(fn),
        group, "gramian",
    )  # fmt: skip
    return transform(params, *args)


def vjp_and_gramian(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    batch_dim: int | None = None,
    in_dims: InDims = 0,
    has_aux: bool = False,
    check_samples: bool = True,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    group: Any = None,
) -> Any:
    """fn's output, a vjp function and the Gramian, from one run of ``fn``.

    Like ``torch.func.vjp`` with the Gramian added: ``vjp_fn(weights)`` returns
    ``sum_r weights[r] * d out[r] / d params`` as a pytree shaped like ``params``, for weights
    shaped like the output. It reuses what the Gramian was computed from (each use's inputs and
    output cotangents), so ``fn`` is not run again and no second backward pass is made, and the
    per-sample gradients the Gramian built where that saves the most work (up to
    ``max_chunk_bytes`` of them, see the Rules page). This is one step of Jacobian descent:
    ``vjp_fn(weighting(G))``.

    Args:
        fn: ``fn(params, *args) -> out``, as for [`gramian_of`][torchgram.gramian_of].
        params: The parameters, any pytree of floating-point tensors.
        *args: fn's other positional arguments.
        batch_dim: As for [`gramian_of`][torchgram.gramian_of].
        in_dims: As for [`gramian_of`][torchgram.gramian_of].
        has_aux: As for [`gramian_of`][torchgram.gramian_of].
        check_samples: As for [`gramian_of`][torchgram.gramian_of].
        max_chunk_bytes: As for [`gramian_of`][torchgram.gramian_of].
        group: As for [`gramian_of`][torchgram.gramian_of].

    Returns:
        ``(out, vjp_fn, G)``, and ``aux`` last with ``has_aux``.

    Examples:
        >>> import torch, torchgram
        >>> def losses(w, x):
        ...     return (x @ w) ** 2                           # [B]
        >>> w, x = torch.randn(3), torch.randn(4, 3)
        >>> out, vjp_fn, G = torchgram.vjp_and_gramian(losses, w, x, batch_dim=0)
        >>> direction = vjp_fn(torchgram.weightings.mean(G))  # the gradient of the mean loss
        >>> torch.allclose(direction, torch.func.grad(lambda w: losses(w, x).mean())(w))
        True
    """
    caller = f"vjp_and_gramian(fn, batch_dim={batch_dim})"
    options = _options(fn, caller, batch_dim, has_aux, check_samples, max_chunk_bytes, group)
    inputs, run = _linearise(fn, (params, *args), (0,), in_dims, options, remembered(fn))
    out = run.out

    def vjp_fn(weights: Tensor) -> Any:
        if not isinstance(weights, Tensor) or weights.shape != out.shape:
            got = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(
                f"vjp_fn(weights): weights must be a tensor shaped like fn's output "
                f"{list(out.shape)}, got {got}. Pass one weight per output element, e.g. "
                "weighting(G) for the Gramian G returned with vjp_fn."
            )
        return inputs.unflatten_params(run.vjp(weights.to(out.dtype)))

    G = run.gramian()
    return (out, vjp_fn, G, run.aux) if has_aux else (out, vjp_fn, G)


def jd_grad(
    fn: Callable[..., Any],
    weighting: Callable[[Tensor], Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    batch_dim: int | None = None,
    in_dims: InDims = 0,
    has_aux: bool = False,
    check_samples: bool = True,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    group: Any = None,
) -> Callable[..., Any]:
    """Transform ``fn`` into a function that returns its Jacobian-descent direction.

    The direction is ``Jᵀ w`` with ``w = weighting(G)``: the Gramian ``G`` of the Jacobian ``J`` of
    ``fn``'s output with respect to ``args[argnums]`` decides how the rows of ``J`` (one per output
    element) are combined. Like ``torch.func.grad``, the result is shaped like the parameters;
    with ``weighting=torchgram.weightings.sum`` it is the gradient of ``out.sum()``.

    Args:
        fn: As for [`gramian_of`][torchgram.gramian_of].
        weighting: A function from a (generalized) Gramian to weights shaped like the output,
            e.g. [`torchgram.weightings.upgrad`][torchgram.weightings.upgrad] or a
            ``functools.partial`` of one.
        argnums: As for [`gramian_of`][torchgram.gramian_of].
        batch_dim: As for [`gramian_of`][torchgram.gramian_of].
        in_dims: As for [`gramian_of`][torchgram.gramian_of].
        has_aux: As for [`gramian_of`][torchgram.gramian_of].
        check_samples: As for [`gramian_of`][torchgram.gramian_of].
        max_chunk_bytes: As for [`gramian_of`][torchgram.gramian_of].
        group: As for [`gramian_of`][torchgram.gramian_of].

    Returns:
        A function with fn's positional arguments returning the direction (and aux).

    Examples:
        >>> import torch, torchgram
        >>> def losses(w, x):
        ...     return (x @ w - 1) ** 2
        >>> step = torchgram.jd_grad(losses, torchgram.weightings.upgrad, batch_dim=0)
        >>> step(torch.zeros(3), torch.randn(8, 3)).shape
        torch.Size([3])
    """
    caller = f"jd_grad(fn, batch_dim={batch_dim})"
    options = _options(fn, caller, batch_dim, has_aux, check_samples, max_chunk_bytes, group)
    numbers = normalize_argnums(argnums, caller)
    if not callable(weighting):
        raise TypeError(
            f"{caller}: weighting must be a function from a Gramian to weights, e.g. "
            f"torchgram.weightings.upgrad, got {type(weighting).__name__}."
        )
    probes = Probes()

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        inputs, run = _linearise(fn, args, numbers, in_dims, options, probes)
        try:
            weights = _checked_weights(weighting(run.gramian()), run.out, caller)
        except Exception:
            restore(run.statistics)  # a call that fails leaves the running statistics as found
            raise
        direction = inputs.unflatten_params(run.vjp(weights))
        return (direction, run.aux) if has_aux else direction

    return wrapper


def _checked_weights(weights: Any, out: Tensor, caller: str) -> Tensor:
    """The weighting's result, checked: one weight per element of fn's output."""
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"{caller}: weighting returned a {type(weights).__name__}; it must return a tensor "
            f"of weights shaped like fn's output {list(out.shape)}, as the functions of "
            "torchgram.weightings do. Wrap a custom result in torch.as_tensor."
        )
    if weights.shape != out.shape:
        raise ValueError(
            f"{caller}: weighting returned weights of shape {list(weights.shape)}, but fn's "
            f"output has shape {list(out.shape)}: one weight per output element is needed. A "
            "weighting of an [m, m] Gramian should reshape its weights to the output's shape "
            "(torchgram.weightings do, for a generalized Gramian)."
        )
    return weights.to(out.dtype)

"""Hooks: reversible behaviour attached to a model method, in a small registry of our own.

Why our own, in the spirit of diffusers' ``HookRegistry``: a plan *replaces* a model's
computation, yet the hooks others install (accelerate's offload, diffusers' group offloading and
layerwise casting, the runner's timers, Step Rehash) must keep running around it. accelerate's
``add_hook_to_module`` and diffusers' ``HookRegistry`` both wrap ``module.forward`` and keep the
callable they wrap where it can be read back (``module._old_forward``, ``fn_ref.forward``). So
the chain of wrappers is walkable: a plan is linked in at its *innermost* slot (where the original
method would be called, under everybody's wrappers), any other hook of ours at the *outermost*,
and a hook is removed by relinking the one slot that holds it — in any order, whoever installed
the others. A link that cannot be reached any more (captured by an unknown wrapper) becomes a
pass-through, so removal never breaks a chain.

Modules a plan does not call (containers like ``down_blocks.0``; the executor calls their leaves)
may carry hooks too: :func:`bridge_for` runs the ones whose work does not depend on the call's
arguments (weight onload/offload, casting) around the plan's segments, and names the others so the
plan can refuse them. Per-call state is reset by :func:`reset_state` at each pipeline call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..planner.errors import PlanConflictError

__all__ = [
    "PLAN_HOOK",
    "Bridge",
    "Hook",
    "HookHandle",
    "PlanConflictError",
    "bridge_for",
    "foreign_hooks",
    "get_hook",
    "hooked_modules",
    "hook_signature",
    "hooks_on",
    "register_hook",
    "remove_hook",
    "reset_state",
    "stateful_hooks",
]

PLAN_HOOK = "vramplan.plan"
_ATTR = "_vramplan_hooks"


class Hook:
    """Behaviour around (or instead of) one model method.

    ``wrap`` is called with the module, the next callable of the chain and the call's arguments;
    the default calls through. ``reset_state`` forgets per-call state (a feature cache kept across
    the UNet calls of one pipeline call); ``on_remove`` runs when the hook is detached.
    """

    def wrap(self, module: torch.nn.Module, call_next: Callable, args: tuple, kwargs: dict) -> Any:
        return call_next(*args, **kwargs)

    def reset_state(self) -> None:
        pass

    def on_remove(self, module: torch.nn.Module) -> None:
        pass


class _Link:
    """One hook's place in a method's chain of wrappers: calls ``hook.wrap`` with the next callable.

    A hook may be its own link (the plan is: ``model.forward is handle``, as before hooks existed)."""

    module: torch.nn.Module
    method: str
    hook: Hook
    inner: Callable | None  # None: the class's own method
    active: bool

    def _link(self, module: torch.nn.Module, method: str, hook: Hook, inner: Callable | None) -> None:
        self.module, self.method, self.hook, self.inner, self.active = module, method, hook, inner, True

    def next(self) -> Callable:
        if self.inner is not None:
            return self.inner
        return getattr(type(self.module), self.method).__get__(self.module)

    @property
    def __wrapped__(self) -> Callable:  # inspect.signature(model.forward) sees the original signature
        return self.next()

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.next()(*args, **kwargs)
        return self.hook.wrap(self.module, self.next(), args, kwargs)

    def __repr__(self) -> str:
        return f"<vramplan hook {type(self.hook).__name__} on {type(self.module).__name__}.{self.method}>"

    def __reduce_ex__(self, protocol):
        """A copy of the model (``copy.deepcopy``, ``torch.save``) does not inherit vramplan hooks (a
        plan's ops hold the original's modules and cannot be pickled): the copied slot calls straight
        through to what this link wraps, in the copy."""
        if self.inner is not None:
            return _same, (self.inner,)
        return _original_method, (self.module, self.method)


@dataclass
class _Registry:
    hooks: dict[str, tuple[Hook, _Link]] = field(default_factory=dict)

    def __reduce_ex__(self, protocol):
        return _Registry, ()  # see _Link.__reduce_ex__


def _same(value: Any) -> Any:
    return value


def _original_method(module: torch.nn.Module, method: str) -> Callable:
    return getattr(type(module), method).__get__(module)


@dataclass(eq=False)
class HookHandle:
    """A registered hook; ``remove()`` (or leaving the ``with`` block) detaches it."""

    module: torch.nn.Module
    name: str
    hook: Hook

    def remove(self) -> None:
        if get_hook(self.module, self.name) is self.hook:
            remove_hook(self.module, self.name)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------------------------- chain walking
class _Opaque(Exception):
    """A wrapper in the chain whose next callable cannot be found."""

    def __init__(self, value: object) -> None:
        super().__init__(repr(value))
        self.value = value


def _is_original(value: object, module: torch.nn.Module, method: str) -> bool:
    return getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is getattr(
        type(module), method, None
    )


def _closure_value(fn: Callable, cls_name: str) -> Any:
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if type(value).__name__ == cls_name:
            return value
    return None


def _next_slot(value: object, module: torch.nn.Module, method: str) -> tuple[object, str] | None:
    """Where the wrapper ``value`` keeps the callable it calls next; None when ``value`` is the original."""
    if value is None or _is_original(value, module, method):
        return None
    if isinstance(value, _Link):
        return value, "inner"
    if isinstance(value, functools.partial):
        qualname = getattr(value.func, "__qualname__", "")
        if qualname.startswith("add_hook_to_module.") and "_old_forward" in module.__dict__:  # accelerate
            return module, "_old_forward"
        if qualname.startswith("HookRegistry.register_hook."):  # diffusers
            ref = _closure_value(value.func, "HookFunctionReference")
            if ref is not None:
                return ref, "forward" if ref.original_forward is None else "original_forward"
    raise _Opaque(value)


def _read(holder: object, attr: str, module: torch.nn.Module, method: str) -> Any:
    if holder is module and attr == method:
        return module.__dict__.get(method)
    return getattr(holder, attr, None)


def _write(holder: object, attr: str, value: Any, module: torch.nn.Module, method: str) -> None:
    if value is None and holder is module and attr == method:
        module.__dict__.pop(method, None)
        return
    if value is None and not isinstance(holder, _Link):  # a foreign slot needs a callable
        value = getattr(type(module), method).__get__(module)
    setattr(holder, attr, value)


def _chain(module: torch.nn.Module, method: str) -> list[tuple[object, str, Any]]:
    """The slots of ``module.method``'s wrapper chain, outermost first; the last holds the original
    (or None: nothing set, the class's method runs)."""
    slots = []
    holder, attr = module, method
    while True:
        value = _read(holder, attr, module, method)
        slots.append((holder, attr, value))
        nxt = _next_slot(value, module, method)
        if nxt is None:
            return slots
        holder, attr = nxt
        if len(slots) > 10_000:
            raise _Opaque(value)


def describe_chain(module: torch.nn.Module, method: str = "forward") -> list[str]:
    """The wrappers around ``module.method``, outermost first (for messages and tests)."""
    names = []
    try:
        slots = _chain(module, method)
    except _Opaque as err:
        return [repr(err.value)]
    for _, _, value in slots[:-1]:
        names.append(repr(value) if isinstance(value, _Link) else getattr(value.func, "__qualname__", repr(value)))
    return names


# ---------------------------------------------------------------------------------- the registry
def _registry(module: torch.nn.Module, create: bool = False) -> _Registry | None:
    reg = module.__dict__.get(_ATTR)
    if reg is None and create:
        reg = _Registry()
        module.__dict__[_ATTR] = reg
    return reg


def register_hook(
    module: torch.nn.Module, hook: Hook, name: str, *, method: str = "forward", innermost: bool = False
) -> HookHandle:
    """Attach ``hook`` to ``module.method`` under ``name``.

    By default it wraps everything already there (like accelerate and diffusers do); with
    ``innermost`` it goes under every existing wrapper, where the original method is called (a plan
    replaces the computation but must leave the wrappers of others running).
    """
    reg = _registry(module, create=True)
    if name in reg.hooks:
        if name == PLAN_HOOK:
            raise PlanConflictError(
                f"{type(module).__name__} already runs under a plan. Remove the first plan's handle "
                f"(handle.remove(), or leave its `with` block) before applying another."
            )
        raise PlanConflictError(f"a hook named {name!r} is already attached to {type(module).__name__}; remove it first")
    if innermost:
        try:
            holder, attr, value = _chain(module, method)[-1]
        except _Opaque as err:
            raise PlanConflictError(
                f"{type(module).__name__}.{method} is wrapped by {err.value!r}, which vramplan cannot see "
                f"through: the plan would bypass it. Apply the plan before installing that wrapper, or remove it."
            ) from None
    else:
        holder, attr, value = module, method, module.__dict__.get(method)
    link = hook if isinstance(hook, _Link) else _Link()
    link._link(module, method, hook, value)
    _write(holder, attr, link, module, method)
    reg.hooks[name] = (hook, link)
    return HookHandle(module, name, hook)


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Detach the hook ``name``; the wrappers installed before or after it keep working."""
    reg = _registry(module)
    if reg is None or name not in reg.hooks:
        return
    hook, link = reg.hooks.pop(name)
    if not reg.hooks:
        del module.__dict__[_ATTR]
    link.active = False  # a pass-through wherever it may still be referenced
    try:
        for holder, attr, value in _chain(module, link.method):
            if value is link:
                _write(holder, attr, link.inner, module, link.method)
                break
    except _Opaque:
        pass  # held by a wrapper we cannot see into: it stays, inactive
    finally:
        hook.on_remove(module)


def get_hook(module: torch.nn.Module, name: str) -> Hook | None:
    reg = _registry(module)
    return reg.hooks[name][0] if reg is not None and name in reg.hooks else None


def hooks_on(module: torch.nn.Module) -> list[str]:
    """Names of the vramplan hooks attached to ``module`` (in attachment order)."""
    reg = _registry(module)
    return list(reg.hooks) if reg is not None else []


def reset_state(*modules: torch.nn.Module) -> None:
    """Forget the per-call state of every vramplan hook in these modules' trees (call at each
    pipeline call, and after it)."""
    for root in modules:
        if not isinstance(root, torch.nn.Module):
            continue
        for m in root.modules():
            reg = _registry(m)
            for hook, _ in list(reg.hooks.values()) if reg is not None else ():
                hook.reset_state()


# ---------------------------------------------------------------------------------- others' hooks
_TORCH_HOOKS = {
    "_forward_pre_hooks": "a PyTorch forward pre-hook",
    "_forward_hooks": "a PyTorch forward hook",
    "_backward_pre_hooks": "a PyTorch backward pre-hook",
    "_backward_hooks": "a PyTorch backward hook",
}
# Hooks whose work does not depend on the call's arguments: they can run around the plan's segments.
_BRIDGEABLE_DIFFUSERS = {"GroupOffloadingHook", "LayerwiseCastingHook", "LayerExecutionTrackerHook"}
_BRIDGEABLE_ACCELERATE = {"AlignDevicesHook", "CpuOffload", "LayerwiseCastingHook"}


def hooked_modules(model: torch.nn.Module, named=None) -> dict[str, torch.nn.Module]:
    """Submodules (not ``model`` itself) that carry any hook: PyTorch's, accelerate's, diffusers',
    ours, or a replaced ``forward``. ``named``: the (name, module) pairs to look at, if already listed
    (walking a UNet's modules costs more than checking them)."""
    found = {}
    for name, m in model.named_modules() if named is None else named:
        d = m.__dict__  # the module's own attributes (checked directly: this runs at every planned call)
        if name and (
            any(d.get(attr) for attr in _TORCH_HOOKS)
            or "forward" in d
            or "_hf_hook" in d
            or d.get(_ATTR) is not None and d[_ATTR].hooks
            or getattr(d.get("_diffusers_hook"), "hooks", None)
        ):
            found[name] = m
    return found


def hook_signature(module: torch.nn.Module) -> tuple:
    """What hooks ``module`` carries, cheaply comparable (to notice hooks added after a plan)."""
    registry = module.__dict__.get("_diffusers_hook")
    return (
        tuple(tuple(getattr(module, attr, None) or ()) for attr in _TORCH_HOOKS),
        id(module.__dict__.get("_hf_hook")),
        tuple(getattr(registry, "_hook_order", ())),
        tuple(hooks_on(module)),
        id(module.__dict__.get("forward")),
    )


def stateful_hooks(module: torch.nn.Module) -> list[str]:
    """diffusers hooks on ``module`` that keep state across calls (caches): they expect one call per
    forward, not one per slice."""
    registry = module.__dict__.get("_diffusers_hook")
    return [
        f"diffusers' {type(registry.hooks[n]).__name__} ({n!r})"
        for n in getattr(registry, "_hook_order", [])
        if getattr(registry.hooks[n], "_is_stateful", False)
    ]


def foreign_hooks(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The hooks on ``module``: (bridgeable, not bridgeable), each described in words."""
    ok, bad = [], []
    for attr, what in _TORCH_HOOKS.items():
        for fn in (getattr(module, attr, None) or {}).values():
            bad.append(f"{what} ({getattr(fn, '__qualname__', repr(fn))})")
    hf = module.__dict__.get("_hf_hook")
    if hf is not None:
        parts = list(getattr(hf, "hooks", None) or [hf]) if type(hf).__name__ == "SequentialHook" else [hf]
        for part in parts:
            name = f"accelerate's {type(part).__name__}"
            (ok if type(part).__name__ in _BRIDGEABLE_ACCELERATE else bad).append(name)
    registry = module.__dict__.get("_diffusers_hook")
    for hook_name in getattr(registry, "_hook_order", []):
        cls = type(registry.hooks[hook_name]).__name__
        (ok if cls in _BRIDGEABLE_DIFFUSERS else bad).append(f"diffusers' {cls} ({hook_name!r})")
    for hook_name in hooks_on(module):
        bad.append(f"vramplan hook {hook_name!r}")
    try:
        _chain(module, "forward")
    except _Opaque as err:
        bad.append(f"a replaced forward ({err.value!r})")
    return ok, bad


@dataclass
class Bridge:
    """The bridgeable hooks of a module the plan does not call, run around the segments holding its
    ops: ``enter`` where its forward would start (onload, cast), ``exit`` where it would end."""

    name: str
    module: torch.nn.Module
    describe: list[str]
    entered: bool = False

    def enter(self) -> None:
        m = self.module
        hf = m.__dict__.get("_hf_hook")
        if hf is not None:
            hf.pre_forward(m)
        registry = m.__dict__.get("_diffusers_hook")
        for hook_name in reversed(getattr(registry, "_hook_order", [])):  # outermost first, as when called
            registry.hooks[hook_name].pre_forward(m)
        self.entered = True

    def exit(self) -> None:
        if not self.entered:
            return
        self.entered = False
        m = self.module
        registry = m.__dict__.get("_diffusers_hook")
        for hook_name in getattr(registry, "_hook_order", []):
            registry.hooks[hook_name].post_forward(m, None)
        hf = m.__dict__.get("_hf_hook")
        if hf is not None:
            hf.post_forward(m, None)


def bridge_for(name: str, module: torch.nn.Module, why: str) -> Bridge:
    """A :class:`Bridge` for the hooks of ``module`` (at path ``name``), or a PlanConflictError naming
    each hook that cannot run without the module's own call (``why`` says why it is not called)."""
    ok, bad = foreign_hooks(module)
    if bad:
        raise PlanConflictError(
            f"{name} carries {', '.join(bad)}, but {why}, so the hook would never fire. Remove the hook, "
            f"put it on a module the plan calls, or run this model without a plan."
        )
    return Bridge(name, module, ok)

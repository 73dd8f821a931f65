"""What every grader shares: one line of feedback, numeric answers, the learner's code
run safely (stubs and errors become feedback), and a spy that notices library calls.

A grader is a function decorated with :func:`grader`. Inside it, :class:`NotYet` ends
the check with "Not yet: <message> Hint: <hint>", and :func:`call` runs the learner's
code: an exception becomes a ``NotYet`` that names it, and with a :class:`Library`
the call is watched for the library functions the exercise asks the learner to write.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import random
import secrets
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

Check = TypeVar("Check", bound=Callable[..., bool])

STUB_HINT = "write your solution first (replace the stub), then run this cell again."


class NotYet(Exception):
    """Ends a check with "Not yet: <message> Hint: <hint>"."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def _report(ok: bool, message: str) -> bool:
    print(("Correct: " if ok else "Not yet: ") + message)
    return ok


def _fail(message: str, hint: str) -> bool:
    return _report(False, f"{message} Hint: {hint}")


def grader(check: Check) -> Check:
    """Make ``check`` print one line and return a bool, whatever the answer does.

    ``NotYet`` raised anywhere inside becomes "Not yet: ... Hint: ...". Any other
    exception (an answer of a type the checks did not foresee) is reported the same
    way instead of a traceback. ``KeyboardInterrupt`` still stops the cell.
    """

    @functools.wraps(check)
    def checked(*args: Any, **kwargs: Any) -> bool:
        try:
            return bool(check(*args, **kwargs))
        except NotYet as not_yet:
            return _fail(not_yet.message, not_yet.hint)
        except Exception as exc:  # never a traceback for a learner: say what broke
            return _fail(f"your answer could not be checked ({_describe(exc)}).",
                         "check the call: pass what the exercise asks for, in that order.")

    return checked  # type: ignore[return-value]


def _describe(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _name(obj: object, default: str = "function") -> str:
    """``my_conv2d`` for a named function or class, "function" for a lambda."""
    name = getattr(obj, "__name__", "")
    return name if name.isidentifier() else default


# --------------------------------------------------------------------------- numbers
def _number(name: str, answer: object) -> float:
    """The answer as a finite float, or ``NotYet`` that says what arrived instead."""
    if answer is Ellipsis or answer is None:
        blank = "..." if answer is Ellipsis else "None"
        raise NotYet(f"{name} has no answer yet (it is still {blank}).",
                     "write your solution first: replace ... with your number, then run the "
                     "cell again.")
    if isinstance(answer, torch.Tensor) and answer.numel() == 1 and not answer.is_complex():
        answer = answer.item()
    if type(answer).__module__ == "numpy" and getattr(answer, "size", 0) == 1:
        answer = answer.item()  # a NumPy scalar or 0-d array, e.g. from np.float64 arithmetic
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise NotYet(f"{name}: expected a number, got {type(answer).__name__} {answer!r:.40}.",
                     "pass a number such as 14.0, not text or a list.")
    value = float(answer)
    if not math.isfinite(value):
        raise NotYet(f"{name} = {value} is not a finite number.",
                     "check for a division by zero or an overflow in your working.")
    return value


def _judge_number(name: str, answer: object, expected: float, slips: Mapping[float, str],
                  rel: float = 0.02) -> str:
    """``"name = value"`` when right; ``NotYet`` with the matching slip's hint when not."""
    value = _number(name, answer)
    if math.isclose(value, expected, rel_tol=rel):
        return f"{name} = {value:.4g}."
    for wrong, hint in slips.items():
        if math.isclose(value, wrong, rel_tol=rel):
            raise NotYet(f"{name} = {value:.4g}.", hint)
    factor = f"off by a factor {value / expected:.3g}" if expected and value else "not right"
    raise NotYet(f"{name} = {value:.4g} is {factor}.",
                 "write the formula with units first, then put in the numbers.")


def _grade_number(name: str, answer: object, expected: float, slips: Mapping[float, str],
                  rel: float = 0.02) -> bool:
    """Compare a numeric answer; a near-miss that equals a known slip gets that slip's hint."""
    return _report(True, _judge_number(name, answer, expected, slips, rel))


def _whole_number(label: str, got: object) -> int:
    """A count returned by the learner as an int (or an integral float or 0-d tensor)."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, numbers.Integral) and not isinstance(got, bool):
        return int(got)
    if isinstance(got, numbers.Real) and not isinstance(got, bool) and float(got).is_integer():
        return int(got)
    if isinstance(got, numbers.Real) and not isinstance(got, bool):
        raise NotYet(f"{label}: got {got!r}, which is not a whole number.",
                     "a count is an integer: use // (floor division), not /.")
    raise NotYet(f"{label}: expected a whole number, got {type(got).__name__} {got!r:.40}.",
                 "return the count as an int.")


# --------------------------------------------------------------------------- random cases
def fresh_rng() -> random.Random:
    """A generator seeded anew at every call, so that cases cannot be memorised."""
    return random.Random(secrets.randbits(64))


def torch_generator(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**62))


# --------------------------------------------------------------------------- tensors
def _shape(got: object) -> str:
    if isinstance(got, torch.Tensor):
        return f"a tensor of shape {tuple(got.shape)}"
    return f"a {type(got).__name__}"


def _expect_tensor(got: object, shape: tuple[int, ...], label: str, hint: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(shape):
        raise NotYet(f"{label}: expected a tensor of shape {tuple(shape)}, got {_shape(got)}.",
                     hint)
    return got


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> bool:
    """Values agree (in float64), whatever the two dtypes; NaN never agrees."""
    if got.is_complex() or got.shape != expected.shape:
        return False
    return bool(torch.allclose(got.detach().to(torch.float64), expected.to(torch.float64),
                               atol=atol, rtol=rtol))


# --------------------------------------------------------------------------- library calls
def _codes(obj: object, seen: set[int] | None = None) -> Iterable[types.CodeType]:
    """The code objects of a function, of a class's methods, or of a module's functions."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for accessor in (obj.fget, obj.fset):
            if accessor is not None:
                yield from _codes(accessor, seen)
        return
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        function = inspect.unwrap(getattr(obj, "__func__", obj))
        if hasattr(function, "__code__"):  # not a decorator's wrapper, which others share
            yield function.__code__
    elif inspect.isclass(obj):
        for member in vars(obj).values():
            if isinstance(member, (staticmethod, classmethod, property)) or \
                    inspect.isfunction(member):
                yield from _codes(member, seen)
    elif inspect.ismodule(obj):
        for member in vars(obj).values():
            if (inspect.isfunction(member) or inspect.isclass(member)) and \
                    getattr(member, "__module__", None) == obj.__name__:
                yield from _codes(member, seen)


def _torch_key(func: Callable) -> str:
    """``"conv2d"`` for ``torch.conv2d`` and ``F.conv2d``; ``"Tensor.backward"`` for a method."""
    name = getattr(func, "__name__", "")
    qualname = getattr(func, "__qualname__", "")
    if qualname.startswith(("TensorBase.", "Tensor.", "_TensorBase.")):
        return "Tensor." + name
    return name


@dataclass(frozen=True)
class Library:
    """What an exercise asks the learner to write instead of calling.

    ``torch`` maps torch function names (``"conv2d"``, ``"Tensor.backward"``) to the name
    shown to the learner; ``python`` lists functions, classes or modules (each with that
    name) whose code must not run; ``check(func, args)`` may flag other torch calls
    (such as indexing one particular tensor). ``task`` and ``hint`` finish the message.
    """

    task: str
    hint: str
    torch: Mapping[str, str] = field(default_factory=dict)
    python: tuple[tuple[object, str], ...] = ()
    check: Callable[[Callable, tuple], str | None] | None = None

    def watched_code(self) -> dict[types.CodeType, str]:
        return {code: label for obj, label in self.python for code in _codes(obj)}


class _Spy(TorchFunctionMode):
    """Records which of a :class:`Library`'s functions run while it is active.

    Torch functions and methods are seen through ``__torch_function__``; Python
    functions and classes (``nn.RNN``, ``torch.optim.Adagrad``, the book's own helpers)
    through ``sys.setprofile``, by their code objects, whatever name they were imported as.
    """

    def __init__(self, library: Library) -> None:
        super().__init__()
        self.library = library
        self.code = library.watched_code()
        self.used: list[str] = []
        self._profiling = False

    def _note(self, label: str | None) -> None:
        if label and label not in self.used:
            self.used.append(label)

    def __torch_function__(self, func, _types, args=(), kwargs=None):  # noqa: ANN001
        self._note(self.library.torch.get(_torch_key(func)))
        if self.library.check is not None:
            self._note(self.library.check(func, args))
        return func(*args, **(kwargs or {}))

    def _profile(self, frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call":
            self._note(self.code.get(frame.f_code))

    def __enter__(self) -> _Spy:
        super().__enter__()
        # Python code is watched through sys.setprofile, unless a profiler already uses it.
        self._profiling = bool(self.code) and sys.getprofile() is None
        if self._profiling:
            sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._profiling:
            sys.setprofile(None)
        super().__exit__(*exc_info)


def _require_callable(fn: object) -> None:
    """``NotYet`` unless ``fn`` is a function or class (``...`` is the edition's stub)."""
    if fn is Ellipsis or fn is None:
        blank = "..." if fn is Ellipsis else "None"
        raise NotYet(f"no answer yet (it is still {blank}).", STUB_HINT)
    if not callable(fn):
        raise NotYet(f"expected a function (or class), got {type(fn).__name__} {fn!r:.40}.",
                     "pass the function itself, without calling it: check_x(f), not check_x(f()).")


def call(fn: Callable[..., Any], *args: Any, label: str | None = None,
         library: Library | None = None, hint: str | None = None, **kwargs: Any) -> Any:
    """Run the learner's ``fn(*args, **kwargs)`` and return its result.

    A stub (``NotImplementedError``) or any other exception becomes ``NotYet``; so does a
    call to the ``library`` the exercise asks the learner to write. ``label`` names the
    code in messages ("your my_conv2d"); ``hint`` follows an exception.
    """
    who = f"your {label or _name(fn)}"
    _require_callable(fn)
    spy = _Spy(library) if library is not None else None
    try:
        if spy is None:
            result = fn(*args, **kwargs)
        else:
            with spy:
                result = fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise NotYet(f"{who} is not written yet ({_describe(exc)}).", STUB_HINT) from None
    except NotYet:
        raise
    except Exception as exc:
        raise NotYet(f"{who} raised {_describe(exc)}.",
                     hint or "run it by hand on a small input to see where it fails.") from None
    if spy is not None and spy.used:
        assert library is not None
        raise NotYet(f"{who} calls {spy.used[0]}; {library.task}.", library.hint)
    return result


AUTOGRAD = {"Tensor.backward": "autograd (.backward())", "grad": "autograd (torch.autograd.grad)"}

"""What every conformance suite shares: the no-weakening rule and capability skips."""

from __future__ import annotations

import pytest

__all__ = ["BaseConformance"]

_KIT_PREFIX = "streamspace_sdk.testing"


class BaseConformance:
    """Base of the kit's suites. A driver's test class subclasses one suite and supplies its
    one required fixture; it inherits every test.

    A driver may not weaken a suite: deleting a test (``test_x = None``) or overriding one is
    a failure, unless the override is marked ``@pytest.mark.xfail(reason=...)`` so the gap is
    written down and the test reports it.
    """

    def test_suite_is_not_weakened(self) -> None:
        """Contract: every test of the kit runs; an override is an xfail with a reason.

        Troubleshooting: instead of deleting or rewriting a kit test, override it with
        ``@pytest.mark.xfail(reason="why this driver cannot do it")`` and call ``super()``.
        """
        problems = []
        cls = type(self)
        kit_names = {
            name
            for klass in cls.__mro__
            if klass.__module__.startswith(_KIT_PREFIX)
            for name in vars(klass)
            if name.startswith("test_")
        }
        for name in sorted(kit_names):
            owner = next(k for k in cls.__mro__ if name in vars(k))
            if owner.__module__.startswith(_KIT_PREFIX):
                continue
            value = vars(owner)[name]
            if not callable(value):
                problems.append(f"{name} is deleted in {owner.__qualname__}")
            elif not _xfail_reason(value):
                problems.append(
                    f"{name} is overridden in {owner.__qualname__} without "
                    "@pytest.mark.xfail(reason=...)"
                )
        assert not problems, "; ".join(problems)

    @staticmethod
    def require(capabilities: frozenset[str], capability: str) -> None:
        """Skip the calling test, with a reason, when ``capability`` is missing."""
        if capability not in capabilities:
            pytest.skip(f"driver lacks capability {capability!r}")


def _xfail_reason(func: object) -> str:
    for mark in getattr(func, "pytestmark", []):
        if mark.name == "xfail" and mark.kwargs.get("reason"):
            return str(mark.kwargs["reason"])
    return ""

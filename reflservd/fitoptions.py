"""refl1d's fit options as the server offers them: the fitters, and the
options a fit request may carry with their types and the fitters they apply
to. The submit page builds its form from them and reads it back with
``fitOptions``; ``reflq submit`` takes the same options. Only the standard
library and ``reflservd.errors``, so that ``reflworkerd`` may import it.
"""

import math

from reflservd.errors import Refused

DEFAULT_FITTER = "amoeba"
FITTERS = (("", "refl1d's default (amoeba)"), ("lm", "Levenberg-Marquardt (lm)"),
           ("amoeba", "Nelder-Mead simplex (amoeba)"), ("dream", "DREAM, Bayesian uncertainty (dream)"),
           ("de", "differential evolution (de)"), ("newton", "quasi-Newton BFGS (newton)"),
           ("pt", "parallel tempering (pt)"))
OPTION_FIELDS = (
    # name, label, type, input attributes, the fitters it applies to ("" = all)
    ("steps", "Steps", int, {"min": "0"}, "amoeba de dream newton lm pt"),
    ("samples", "Samples", int, {"min": "1"}, "dream"),
    ("burn", "Burn-in steps", int, {"min": "0"}, "dream pt"),
    ("pop", "Population", float, {"step": "any"}, "de dream"),
    ("init", "Initializer", ("eps", "lhs", "cov", "random"), {}, "dream"),
    ("seed", "Seed", int, {"min": "1"}, ""),
    ("time", "Time limit (hours)", float, {"min": "0", "step": "any"}, ""),
)
OPTION_NAMES = tuple(name for name, *_ in OPTION_FIELDS)


def fitOptions(values):
    """The fit options of a form's text ``values`` (``{name: text}``): the
    fitter, and each option that is filled in and applies to that fitter,
    as its type; ``Refused`` naming the first that is not valid."""
    options = {}
    if values.get("fit"):
        if values["fit"] not in [value for value, _ in FITTERS if value]:
            raise Refused("unknown fitter %r" % (values["fit"],))
        options["fit"] = values["fit"]
    fitter = values.get("fit") or DEFAULT_FITTER
    for name, label, kind, _, fitters in OPTION_FIELDS:
        text = values.get(name, "")
        if not text or (fitters and fitter not in fitters.split()):
            continue
        if isinstance(kind, tuple):
            if text not in kind:
                raise Refused("%s must be one of %s" % (label, ", ".join(kind)))
            options[name] = text
            continue
        try:
            options[name] = kind(text)
        except ValueError:
            raise Refused("%s must be %s, not %r"
                          % (label, "a whole number" if kind is int else "a number", text))
        if kind is float and not math.isfinite(options[name]):
            raise Refused("%s must be a finite number" % (label,))
    return options

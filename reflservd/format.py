"""How the server's pages and mails and the ``reflq`` command write a job's
values: durations, numbers with their uncertainties, and any JSON value as
text that can be shown anywhere. Only the standard library."""

import decimal
import json
import math
import re


def formatDuration(seconds, missing="-"):
    """``H:MM:SS`` (what reflq, the pages and the mails show), or ``missing``
    for anything that is not a finite number of seconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return missing
    if isinstance(seconds, float) and not math.isfinite(seconds):
        return missing
    seconds = int(round(max(0, seconds)))
    hours, rest = divmod(seconds, 3600)
    return "%d:%02d:%02d" % (hours, rest // 60, rest % 60)


_SURROGATES = re.compile("[\ud800-\udfff]")


def displayText(value, missing="", limit=None):
    """Any value a job carries, whatever its JSON type, as text that can be
    written anywhere (a page, a mail, a terminal): a string with its lone
    surrogates replaced by U+FFFD, a number or a boolean as written, an object
    or a list as compact JSON (as the pages' scripts write it); ``missing``
    for None. ``limit`` clips it."""
    if value is None:
        return missing
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        try:
            text = str(value)
        except ValueError:          # past Python's limit on the digits of an int
            text = "(an integer of %d bits)" % (value.bit_length(),)
    elif isinstance(value, float):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
        except (ValueError, TypeError, RecursionError):
            text = "(%s)" % (type(value).__name__,)
    text = _SURROGATES.sub("\ufffd", text)
    if limit is not None and len(text) > limit:
        text = text[:max(0, limit - 1)] + "…"
    return text


def field(value, *keys):
    """``value[k1][k2]…`` where each step is an object that has the key, else
    None: a job's request, progress and result may hold any JSON type."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def fitSteps(request):
    """The number of steps a job's request asks for (``data.options.steps``),
    or None when it names no positive whole number."""
    steps = field(request, "data", "options", "steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


def lastLine(text):
    """The last line of an error's text (what a one-line report shows), as `displayText`."""
    lines = displayText(text).strip().splitlines()
    return lines[-1] if lines else ""


_WIDEST = 30
"""Past this many digits between a value's first and its uncertainty's second,
the two are written apart (1e+300 ± 1.0e-300) rather than to one place."""
_DECIMALS = decimal.Context(prec=_WIDEST + 10, Emin=-decimal.MAX_EMAX, Emax=decimal.MAX_EMAX)


def formatValue(value, uncertainty=None, digits=6):
    """A number as the pages, the mails and reflq show it.

    With a finite positive uncertainty: ``value ± uncertainty``, the
    uncertainty to two significant digits and the value to the same decimal
    place, with a shared power of ten (``(3.000 ± 0.020)e-7``) when they
    are very large or very small. Without one: an integer with all its
    digits, a float to ``digits`` significant digits. Anything else (a
    string, an object, NaN …) as `displayText`."""
    number = _exact(value)
    if number is None:
        return displayText(value)
    spread = _exact(uncertainty)
    if spread is None or spread <= 0:
        return displayText(value) if isinstance(value, int) else "%.*g" % (digits, value)
    with decimal.localcontext(_DECIMALS):
        place = spread.adjusted() - 1            # the uncertainty's second digit
        spread = spread.quantize(decimal.Decimal(1).scaleb(place))
        if spread.adjusted() - 1 > place:        # 9.96 rounded to 10.0: two digits are 10
            place += 1
            spread = spread.quantize(decimal.Decimal(1).scaleb(place))
        if number and number.adjusted() - place > _WIDEST:
            return "%s ± %s" % (formatValue(value, digits=digits), format(spread, ".1e"))
        number = number.quantize(decimal.Decimal(1).scaleb(place))
        lead = max(number.adjusted() if number else spread.adjusted(), spread.adjusted())
        if -4 <= lead < 6:
            return "%s ± %s" % (format(number, "f"), format(spread, "f"))
        return "(%s ± %s)e%+d" % (format(number.scaleb(-lead), "f"), format(spread.scaleb(-lead), "f"), lead)


def formatParameter(value):
    """A fitted parameter of a result: ``{"value", "uncertainty"}`` as
    `formatValue` writes the pair, anything else as a bare value."""
    if isinstance(value, dict):
        return formatValue(value.get("value"), value.get("uncertainty"))
    return formatValue(value)


def _exact(value):
    """A finite int or float as an exact Decimal, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return decimal.Decimal(value)


PROVENANCE_LINES = (("service", "service"), ("versions", "versions"), ("seed", "seed"),
                    ("options", "options"), ("model", "model"), ("inputs", "sha256"),
                    ("queue", "queue"), ("worker", "worker"), ("host", "host"),
                    ("backend", "backend"), ("sandbox", "sandbox"), ("confinement", "confinement"),
                    ("limits", "limits"), ("attempts", "attempts"))


def provenanceLines(provenance, when):
    """``[(label, text)]`` of a result's provenance (docs/api.md), for ``reflq
    show --provenance`` and the job page; ``when(seconds)`` writes a time."""
    if not isinstance(provenance, dict):
        return [("provenance", "- (none recorded: not a completed refl1d fit)")]
    lines = []
    for key, label in PROVENANCE_LINES:
        value = provenance.get(key)
        if isinstance(value, dict):
            lines += [(label if i == 0 else "", "%s %s" % (name, displayText(v)))
                      for i, (name, v) in enumerate(sorted(value.items()))]
        elif value is not None:
            lines.append((label, displayText(value)))
    lines += [("fit " + key, when(provenance.get(key))) for key in ("started", "finished")]
    return lines

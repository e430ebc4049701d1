"""What a client sends is parsed or refused, never crashed on (issue 8 §6):
hypothesis on the multipart/urlencoded form parser (``web.formParts``) and the
legacy parsers (``legacy.parseResults``, ``legacy.inlineFiles``). Arbitrary
input yields a value or the route's error (``APIError``, or ``BadName`` for
a file name), which the site answers as a JSON 4xx; well-formed input comes
back as it was sent."""

import base64
import json
from io import BytesIO
from urllib.parse import urlencode

from hypothesis import example, given, settings, strategies as st

from reflservd import legacy
from reflservd.errors import BadName
from reflservd.web import APIError, formParts

LIMIT = 1 << 20
DEEP = "[" * 100_000
"""A body nested past any recursion limit: the first case a parser that
recurses falls over on."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


class FormRequest:
    """What formParts reads of a request: its Content-Type and its body."""

    def __init__(self, contentType, body):
        self.contentType = contentType
        self.content = BytesIO(body)

    def getHeader(self, name):
        assert name.lower() == b"content-type"
        return self.contentType


def parseForm(contentType, body):
    """formParts' parts as ``[(name, filename, bytes)]``, or the APIError."""
    try:
        parts = formParts(FormRequest(contentType, body), LIMIT)
    except APIError as e:
        assert 400 <= e.code < 500 and e.message
        return e
    return [(name, filename, f.read()) for name, filename, f in parts]


# ---- the form parser


content_types = st.one_of(
    st.just(b"multipart/form-data; boundary=b0undary"),
    st.just(b"multipart/form-data"),
    st.just(b"application/x-www-form-urlencoded"),
    st.binary(max_size=60),
    st.builds(lambda b: b"multipart/form-data; boundary=" + b, st.binary(min_size=1, max_size=70)),
    st.none())


@settings(max_examples=300, deadline=None)
@given(content_types, st.binary(max_size=2000))
@example(b"multipart/form-data; boundary=b0undary", b"--b0undary\r\n" * 2000)
@example(b"multipart/form-data; boundary=b0undary",
         b'--b0undary\r\nContent-Disposition: form-data; name="\xff\xfe"\r\n\r\n\xff\r\n--b0undary--\r\n')
@example(b"application/x-www-form-urlencoded", b"a=%ff%fe&b")
@example(b"multipart/form-data; boundary=\xff", b"--\xff\r\n")
def test_anyFormBodyIsPartsOrA4xx(contentType, body):
    """Whatever the Content-Type and the body, formParts gives parts or an
    APIError with a 4xx code and a message."""
    result = parseForm(contentType, body)
    assert isinstance(result, (list, APIError))


safe_text = st.text(st.characters(codec="utf-8", exclude_characters='"\\\r\n\0',
                                  exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(safe_text, st.none() | safe_text, st.binary(max_size=300)),
                min_size=1, max_size=6))
def test_aWellFormedMultipartBodyComesBackAsSent(parts):
    """Parts encoded by the book (names and file names quoted, contents
    arbitrary bytes without the boundary) come back in order, byte for byte."""
    boundary = b"reflservd-fuzz-boundary-7f3a"
    chunks = []
    for name, filename, content in parts:
        disposition = b'form-data; name="%s"' % (name.encode(),)
        if filename is not None:
            disposition += b'; filename="%s"' % (filename.encode(),)
        chunks.append(b"--%s\r\nContent-Disposition: %s\r\n\r\n%s\r\n" % (boundary, disposition, content))
    body = b"".join(chunks) + b"--%s--\r\n" % (boundary,)
    result = parseForm(b"multipart/form-data; boundary=" + boundary, body)
    assert result == [(name, filename, content) for name, filename, content in parts]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=6))
def test_aUrlencodedFormComesBackAsSent(pairs):
    """Name-value pairs, blank ones too, come back in order."""
    result = parseForm(b"application/x-www-form-urlencoded", urlencode(pairs).encode())
    assert result == [(name, None, value.encode()) for name, value in pairs]


# ---- the legacy parsers


@settings(max_examples=300, deadline=None)
@given(st.none() | st.text(max_size=200) | json_values.map(json.dumps))
@example(DEEP)
@example('{"status": "COMPLETE", "result": %s}' % (DEEP,))
@example('"\\ud800"')
@example("NaN")
def test_parseResultsAlwaysGivesAnObject(text):
    """A postjob's ``results`` field, whatever it holds, reads as a dict: the
    object sent, or the original server's ERROR carrying the text."""
    results = legacy.parseResults(text)
    assert isinstance(results, dict)
    try:
        sent = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        sent = None
    if isinstance(sent, dict):
        assert results == sent
    else:
        assert results["status"] == "ERROR" and results["trace"] == text


file_contents = st.one_of(
    st.text(max_size=50),
    st.binary(max_size=50).map(lambda b: {"base64": base64.b64encode(b).decode()}),
    st.text(max_size=20).map(lambda t: {"base64": t}),
    json_values)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    st.builds(lambda files, rest: dict(rest, data={"files": files, "model": "m.py"}),
              st.dictionaries(st.text(max_size=12), file_contents, max_size=4) | json_values,
              st.dictionaries(st.text(max_size=8), json_values, max_size=3))))
@example({"data": {"files": {"../etc/passwd": "x"}}})
@example({"data": {"files": {"a.py": {"base64": "!!!"}}}})
@example({"data": {"files": {"\ud800.py": "x"}}})
def test_inlineFilesTakesTheFilesOutOrRefuses(jobRequest):
    """A legacy submit's request gives ``(request without data.files, [(name,
    bytes)])``, or an APIError / BadName that names the bad file; the files
    taken out are the ones sent, decoded."""
    try:
        stored, files = legacy.inlineFiles(jobRequest)
    except (APIError, BadName) as e:
        assert str(e)
        return
    data = jobRequest.get("data")
    if isinstance(data, dict) and "files" in data:
        assert "files" not in stored["data"]
        assert {k: v for k, v in stored.items() if k != "data"} == {
            k: v for k, v in jobRequest.items() if k != "data"}
        sent = data["files"]
        assert [name for name, _ in files] == list(sent)
        for name, content in files:
            original = sent[name]
            if isinstance(original, str):
                assert content == original.encode("utf-8")
            else:
                assert content == base64.b64decode(original["base64"])
    else:
        assert (stored, files) == (jobRequest, [])

"""The whole HTTP site of a server: its four faces, each with its own Klein
app, composed under one root.

``api.JobAPI`` serves ``/api/v1/…``, ``/healthz`` and ``/metrics``;
``seriesapi.SeriesAPI`` ``/api/v1/series…``;
``legacy.LegacyAPI`` the old jobqueue's ``/jobs.json``, ``/jobs/<id>.json``
and the rest; ``pages.JobPages`` the pages (``/``, ``/jobs/<id>``,
``/series/<id>``, ``/submit``) and ``/static/…``. The legacy routes and the pages share the
``/jobs`` prefix, so the root does not branch by prefix: it hands a request
to the first face whose routes match its path and method. A path no face
has is answered 404, and a method no face takes on that path 405 with the
methods that all of them take there, each as ``{"error": …}``.
"""

from twisted.web import resource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect, Rule

from reflservd.access import Access
from reflservd.api import JobAPI
from reflservd.legacy import LegacyAPI
from reflservd.pages import JobPages
from reflservd.seriesapi import SeriesAPI
from reflservd.web import Site, UTF8Paths, jsonBody


class Faces(resource.Resource):
    """The root of the site: each request goes to the face whose Klein app
    has a route for it (``faces``, in order).

    One werkzeug map holds every face's rules, each tagged with its face, so
    that a request is matched once here (and once more by its face's Klein),
    not once per face: asking each face in turn cost the legacy submit two
    more matches and a NotFound raised and caught, about a tenth of its
    time on the reactor."""

    isLeaf = True

    def __init__(self, faces):
        resource.Resource.__init__(self)
        self.faces = faces
        self._resources = [face.app.resource() for face in faces]
        self._map = Map([Rule(rule.rule, **dict(rule.get_empty_kwargs(), endpoint=index))
                         for index, face in enumerate(faces)
                         for rule in face.app.url_map.iter_rules()])

    def render(self, request):
        path = b"/".join(request.postpath).decode("utf-8")
        if not path.startswith("/"):
            path = "/" + path           # as Klein reads it
        method = request.method.decode("latin-1")
        try:
            index, _ = self._map.bind("", path_info=path).match(method=method)
        except NotFound:
            return jsonBody(request, {"error": "no such route: %s" % (request.path.decode("latin-1"),)},
                            404)
        except MethodNotAllowed as e:
            allowed = sorted(e.valid_methods or ())
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
            return jsonBody(request, {"error": "%s is not allowed on %s (allowed: %s)" % (
                method, request.path.decode("latin-1"), ", ".join(allowed))}, 405)
        except RequestRedirect:
            index = self._redirecting(path, method)
        return self._resources[index].render(request)

    def _redirecting(self, path, method):
        """The first face whose own map redirects ``path`` (a slash to add):
        its Klein answers the redirect."""
        for index, face in enumerate(self.faces):
            try:
                face.app.url_map.bind("", path_info=path).match(method=method)
            except RequestRedirect:
                return index
            except (NotFound, MethodNotAllowed):
                continue
        raise AssertionError("the joined map redirected %s, no face's does" % (path,))


def makeSite(server, maxUpload, access=None, metrics=None, **limits):
    """The twisted.web site serving ``server`` under the rules of ``access``
    (``reflservd.access.Access``); bodies past ``maxUpload`` plus a little
    room for the multipart framing are refused before reading; ``limits``
    are `web.Site`'s bounds on connections (and its ``reactor``)."""
    access = access or Access()
    faces = [JobAPI(server, maxUpload=maxUpload, access=access, metrics=metrics),
             SeriesAPI(server, maxUpload=maxUpload, access=access),
             LegacyAPI(server, maxUpload=maxUpload, access=access),
             JobPages(server, maxUpload=maxUpload, access=access)]
    site = Site(UTF8Paths(Faces(faces)), maxBody=maxUpload + (1 << 20), **limits)
    site.metrics = metrics
    site.access = access
    site.faces = faces
    return site

"""The whole HTTP site of a server: the API, the legacy routes, the pages."""

from reflservd.api import JobAPI
from reflservd.legacy import LegacyAPI
from reflservd.pages import JobPages
from reflservd.web import Site, UTF8Paths


class SiteRoutes(JobAPI, LegacyAPI, JobPages):
    """Every route of the site, on the one Klein app (see ``web.Routes``)."""


def makeSite(server, maxUpload, access=None, metrics=None, **limits):
    """The twisted.web site serving ``server`` under the rules of ``access``
    (``reflservd.access.Access``); bodies past ``maxUpload`` plus a little
    room for the multipart framing are refused before reading; ``limits``
    are `web.Site`'s bounds on connections (and its ``reactor``)."""
    routes = SiteRoutes(server, maxUpload=maxUpload, access=access, metrics=metrics)
    site = Site(UTF8Paths(routes.app.resource()), maxBody=maxUpload + (1 << 20), **limits)
    site.metrics = metrics
    site.access = routes.access
    site.routes = routes
    return site

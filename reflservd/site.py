"""The whole HTTP site of a server: the API, the legacy routes, the pages."""

from reflservd.api import JobAPI
from reflservd.legacy import LegacyAPI
from reflservd.pages import JobPages
from reflservd.web import Site


class SiteRoutes(JobAPI, LegacyAPI, JobPages):
    """Every route of the site, on the one Klein app (see ``web.Routes``)."""


def makeSite(server, maxUpload, access=None, metrics=None):
    """The twisted.web site serving ``server`` under the rules of ``access``
    (``reflservd.access.Access``); bodies past ``maxUpload`` plus a little
    room for the multipart framing are refused before reading."""
    routes = SiteRoutes(server, maxUpload=maxUpload, access=access, metrics=metrics)
    site = Site(routes.app.resource(), maxBody=maxUpload + (1 << 20))
    site.metrics = metrics
    site.access = routes.access
    site.routes = routes
    return site

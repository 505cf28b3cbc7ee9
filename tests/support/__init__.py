"""What the tests share: the servers they start (DNS, recipient MTAs, HTTPS for
MTA-STS and WKD), the delivery world, the portal and archive-API clients, message
builders and waits.  Fixtures defined here are registered for every test by the
root conftest (``pytest_plugins``); helpers are imported from here, never from
another test module."""

# Sealgate in a container: non-root, state on a volume, health-checked.
#   docker build -t sealgate .
#   docker run -d -p 25:10025 -p 443:10443 -v sealgate-state:/var/lib/sealgate sealgate
# Mount your configuration at /etc/sealgate/config.yaml (see config.example.yaml).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends gnupg openssl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10025 --user-group --home-dir /var/lib/sealgate \
            --shell /usr/sbin/nologin sealgate

WORKDIR /opt/sealgate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
RUN pip install --no-cache-dir .

# The built-in configuration: listen on all interfaces inside the container, state on
# the volume.  It relays only for loopback clients until you configure relay.*.
RUN mkdir -p /etc/sealgate /var/lib/sealgate \
 && chown sealgate:sealgate /var/lib/sealgate \
 && printf '%s\n' \
    'state_dir: /var/lib/sealgate' \
    'listen:' \
    '  smtp: "0.0.0.0:10025"' \
    '  http: "0.0.0.0:10080"' \
    'portal:' \
    '  listen: "0.0.0.0:10443"' \
    'api:' \
    '  listen: "0.0.0.0:10444"' \
    > /etc/sealgate/config.yaml

USER sealgate
VOLUME ["/var/lib/sealgate"]
EXPOSE 10025 10080 10443 10444
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:10080/healthz', timeout=3)"]
ENTRYPOINT ["sealgate"]
CMD ["run", "--config", "/etc/sealgate/config.yaml"]

# drawdown in a container. Build: docker build -t drawdown .
# Run (credentials are required off loopback; create them with `htpasswd -cB htpasswd AGENT`):
#   docker run -p 8080:8080 -v $PWD/data:/data drawdown
# with ./data/htpasswd present. The CA agents must trust is written to ./data/confdir.
FROM python:3.13-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY addon ./addon
COPY policies ./policies
RUN pip install --no-cache-dir ".[postgres]"

# Not root: a proxy parses whatever its agents send. A bind-mounted ./data must be writable by
# uid 10001 (`chown -R 10001 data`); a named volume takes /data's owner from the image.
RUN useradd --system --uid 10001 --no-create-home drawdown && mkdir /data && chown drawdown /data
USER 10001

VOLUME /data
EXPOSE 8080
# /readyz: the policy in force and the ledger open (see README, "Health probes").
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s CMD ["python", "-c", \
  "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/readyz', timeout=2)"]
ENTRYPOINT ["drawdown"]
CMD ["run", "--policy", "/app/policies/default.yaml", "--db", "/data/drawdown.db", \
     "--listen", "0.0.0.0:8080", "--confdir", "/data/confdir", \
     "--set", "proxyauth=@/data/htpasswd"]

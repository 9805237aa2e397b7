# The mirror's container image: a virtualenv built in one stage, copied onto a
# clean base in the next; runs as a non-root user with its cache in a volume.
#
#   docker build -t mirror .
#   docker run -p 5000:5000 -v mirror-data:/var/lib/mirror mirror
#   docker run -v ./mirror.yaml:/etc/mirror/mirror.yaml:ro ... mirror   # your own config
#
# Build arguments:
#   BASE_IMAGE  the base of both stages: it needs python3 (>= 3.11) with venv
#   WHEELS      a folder in the build context holding every wheel (made with
#               `pip wheel -w wheels .`): installs with no package index at all

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG WHEELS=""
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/mirror \
    && if [ -n "${WHEELS}" ]; then \
         /opt/mirror/bin/pip install --no-cache-dir --no-index --find-links "${WHEELS}" \
             "${WHEELS}"/mirror-*.whl; \
       else \
         /opt/mirror/bin/pip install --no-cache-dir /src; \
       fi \
    && /opt/mirror/bin/mirror --version

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="mirror" \
      org.opencontainers.image.description="Pull-through cache and regional mirror for OCI container registries" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/lib/mirror --shell /usr/sbin/nologin mirror \
    && mkdir -p /var/lib/mirror /etc/mirror \
    && chown mirror:mirror /var/lib/mirror
COPY --from=build /opt/mirror /opt/mirror
COPY config/mirror.container.yaml /etc/mirror/mirror.yaml
ENV PATH=/opt/mirror/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MIRROR_HEALTHCHECK_URL=http://127.0.0.1:5000/healthz
USER 10001:10001
WORKDIR /var/lib/mirror
VOLUME ["/var/lib/mirror"]
EXPOSE 5000
# Liveness of this process, so an https URL is checked without verifying the certificate.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, ssl, urllib.request as r; r.urlopen(os.environ['MIRROR_HEALTHCHECK_URL'], timeout=4, context=ssl._create_unverified_context())"]
ENTRYPOINT ["mirror"]
CMD ["serve", "--config", "/etc/mirror/mirror.yaml"]

#!/bin/sh
# A tiny web server in the guest, started at every boot.
mkdir -p /srv/www
echo "hello from $(hostname)" > /srv/www/index.html
busybox httpd -p 8080 -h /srv/www

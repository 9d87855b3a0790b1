#!/bin/sh
# The fidelity study's third corpus: Perl's manual (Debian bookworm's perl-doc 5.36.0-7+deb12u*,
# 206 .pod files, 8.8 MB of POD), rendered to plain text with pod2text (perl's own Pod::Text),
# one .txt per .pod so `pmnode data prepare` holds out whole files. English technical prose with
# code examples, like the Vim manual; nothing of it is in the Python standard library.
#   sh scripts/perl_doc_corpus.sh [OUT]        (default /tmp/perl-doc-text)
# Needs apt-get (no root: `apt-get download` fetches the .deb only), dpkg-deb and pod2text (perl).
set -eu
OUT=${1:-/tmp/perl-doc-text}
WORK=$(mktemp -d)
cd "$WORK"
apt-get download perl-doc >/dev/null
dpkg-deb -x perl-doc_*.deb x
mkdir -p "$OUT"
for pod in x/usr/share/perl/*/pod/*.pod; do
  pod2text --width 76 "$pod" > "$OUT/$(basename "$pod" .pod).txt"
done
echo "$(ls "$OUT" | wc -l) files, $(cat "$OUT"/*.txt | wc -c) bytes in $OUT from $(ls perl-doc_*.deb)"
rm -rf "$WORK"

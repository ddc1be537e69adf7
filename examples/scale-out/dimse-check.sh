#!/bin/sh
# HAProxy external check of one serve node: HAProxy passes
# <proxy address> <proxy port> <server address> <server port>.
# --proxy-protocol: the node expects a PROXY header; a v2 LOCAL one says "a health
# check, judge me by my own address". Exit 0 = up.
exec dimse-async check "$3" "$4" --aec ARCHIVE --proxy-protocol --timeout 3

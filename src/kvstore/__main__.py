"""``python -m kvstore {kv,node,client,createznode,check,demo,bench,certs} ...``"""

import sys

try:
    from kvstore.cli import main
except KeyboardInterrupt:  # Ctrl-C while the package itself loads: as kvstore.cli.run says it
    print("kvstore: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())

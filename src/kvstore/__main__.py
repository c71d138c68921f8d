"""``python -m kvstore {node,client,createznode,check,demo,bench} ...``"""

import sys

from kvstore.cli import main

sys.exit(main())

"""``python -m kvstore {node,client,createznode,check,demo} ...``"""

import sys

from kvstore.cli import main

sys.exit(main())

import sys

from captcha_fast.cli import main

sys.exit(main())

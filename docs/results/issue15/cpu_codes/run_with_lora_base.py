"""cbq quantize with CBQConfig.lora_base replaced (the old recipe: 'step')."""
import dataclasses
import sys

import cbq_ptq.cli as cli

base = sys.argv.pop(1)
orig = cli.build_config
cli.build_config = lambda a, s, d: dataclasses.replace(orig(a, s, d), lora_base=base)
sys.exit(cli.main(sys.argv[1:]))

from xal_engine.cli import main

raise SystemExit(main())

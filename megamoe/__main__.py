from megamoe.cli import main

raise SystemExit(main())

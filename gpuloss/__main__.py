from gpuloss.cli import main

raise SystemExit(main())

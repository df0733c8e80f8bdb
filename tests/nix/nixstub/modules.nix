# A small module-system evaluator with nixpkgs' rules, for ./lib.nix's vocabulary: imports
# (deduplicated by path), options merged from every module, definitions pushed down through
# mkIf/mkMerge/mkOverride without evaluating conditions early, the highest priority winning,
# option defaults at mkOptionDefault, types checked, and `_module.args` as module arguments.
#
# Inside a declared namespace (services.hive-c0re, hyperhive, …) a definition of an option that
# does not exist is an error, as in NixOS. Everything undeclared (systemd.services, networking…)
# merges freely: attribute sets recursively, lists by concatenation, anything else must agree.
lib:
{
  modules,
  specialArgs ? { },
}:
let
  b = builtins;
  showPath = path: b.concatStringsSep "." path;
  typeOf = v: if b.isAttrs v then v._type or null else null;
  isOption = v: typeOf v == "option";
  isProperty = v: b.elem (typeOf v) [
    "if"
    "merge"
    "override"
    "order"
  ];

  # ------------------------------------------------------------------ loading

  # Fixed arguments first: looking into config._module.args before a module is loaded would
  # evaluate the very modules that are being loaded.
  fixedArgs = specialArgs // {
    inherit lib config options;
  };
  argument =
    key: name:
    fixedArgs.${name} or config._module.args.${name}
      or (throw "module ${key} wants the argument `${name}'");

  load =
    key: m:
    let
      imported = b.isPath m || b.isString m;
      value = if imported then import m else m;
      called =
        if b.isFunction value then
          value (
            b.mapAttrs (name: _: argument key name) (b.functionArgs value)
          )
        else
          value;
      structured = called ? config || called ? options;
    in
    {
      inherit key;
      imports = called.imports or [ ];
      options = if structured then called.options or { } else { };
      config =
        if structured then
          called.config or { }
        else
          b.removeAttrs called [
            "imports"
            "_file"
            "key"
            "meta"
            "disabledModules"
          ];
    };

  items =
    parent: ms:
    b.genList (
      i:
      let
        m = b.elemAt ms i;
      in
      {
        key = if b.isPath m || b.isString m then toString m else "${parent}:${toString i}";
        module = m;
      }
    ) (b.length ms);

  closure = b.genericClosure {
    startSet = items "<modules>" modules;
    operator = item: items item.key (load item.key item.module).imports;
  };

  loaded = map (item: load item.key item.module) closure;

  # ------------------------------------------------------------------ declarations

  mergeDecls =
    path: a: c:
    if isOption a || isOption c then
      throw "The option `${showPath path}' is declared twice"
    else
      a
      // b.mapAttrs (n: v: if a ? ${n} then mergeDecls (path ++ [ n ]) a.${n} v else v) c;

  options = b.foldl' (mergeDecls [ ]) { } (map (m: m.options) loaded);

  # ------------------------------------------------------------------ definitions

  # name → [value], without evaluating any condition (nixpkgs' pushDownProperties).
  pushDown =
    v:
    let
      t = typeOf v;
    in
    if t == "if" then
      b.mapAttrs (_: map (lib.mkIf v.condition)) (pushDown v.content)
    else if t == "merge" then
      zipLists (map pushDown v.contents)
    else if t == "override" then
      b.mapAttrs (_: map (lib.mkOverride v.priority)) (pushDown v.content)
    else if t == "order" then
      pushDown v.content
    else if b.isAttrs v && t == null then
      b.mapAttrs (_: x: [ x ]) v
    else
      throw "not an attribute set: ${b.typeOf v}";

  zipLists = b.foldl' (acc: set: acc // b.mapAttrs (n: vs: (acc.${n} or [ ]) ++ vs) set) { };

  # defs: [{ file; value }] → name → [{ file; value }]
  zipDefs =
    defs:
    zipLists (
      map (
        def:
        b.mapAttrs (
          _:
          map (value: {
            inherit (def) file;
            inherit value;
          })
        ) (pushDown def.value)
      ) defs
    );

  # One definition, its conditions evaluated: [{ value; priority }].
  discharge =
    v:
    let
      t = typeOf v;
    in
    if t == "if" then
      (if v.condition then discharge v.content else [ ])
    else if t == "merge" then
      b.concatMap discharge v.contents
    else if t == "override" then
      map (x: x // { priority = v.priority; }) (discharge v.content)
    else if t == "order" then
      discharge v.content
    else
      [
        {
          value = v;
          priority = 100;
        }
      ];

  dischargeDefs = b.concatMap (def: map (x: x // { inherit (def) file; }) (discharge def.value));

  highest =
    defs:
    let
      best = b.foldl' (p: d: if d.priority < p then d.priority else p) 9999 defs;
    in
    b.filter (d: d.priority == best) defs;

  files = defs: b.concatStringsSep ", " (map (d: d.file) defs);

  agree =
    path: defs:
    let
      first = (b.head defs).value;
    in
    if b.length defs == 1 || b.all (d: d.value == first) defs then
      first
    else
      throw "The option `${showPath path}' has conflicting definitions in ${files defs}";

  # ------------------------------------------------------------------ evaluation

  evalNode =
    path: decl: defs:
    if isOption decl then
      evalOption path decl defs
    else if decl == null then
      evalFree path defs
    else
      evalGroup path decl defs;

  evalGroup =
    path: decl: defs:
    let
      byName = zipDefs defs;
      open = path == [ ] || path == [ "services" ];
      unknown = b.filter (n: !(decl ? ${n})) (b.attrNames byName);
      names = b.attrNames (decl // byName);
    in
    if !open && unknown != [ ] then
      throw "The option `${showPath (path ++ [ (b.head unknown) ])}' does not exist (defined in ${files byName.${b.head unknown}})"
    else
      lib.genAttrs names (n: evalNode (path ++ [ n ]) (decl.${n} or null) (byName.${n} or [ ]));

  # Undeclared: attribute sets merge recursively, leaves merge as `agree`/concatenation.
  peel =
    v:
    let
      t = typeOf v;
    in
    if t == "if" || t == "override" || t == "order" then
      peel v.content
    else if t == "merge" then
      (if v.contents == [ ] then { } else peel (b.head v.contents))
    else
      v;
  isNode = v: b.isAttrs v && typeOf v == null && !(v ? outPath);

  # Like attrsOf in nixpkgs, a name whose every definition is switched off (mkIf false) is
  # not there at all.
  evalFree =
    path: defs:
    if freeNode defs then
      b.mapAttrs (n: evalFree (path ++ [ n ])) (lib.filterAttrs (_: freeDefined) (zipDefs defs))
    else
      mergeFree path (highest (dischargeDefs defs));

  freeNode = defs: defs != [ ] && b.all (d: isNode (peel d.value)) defs;
  freeDefined = defs: dischargeDefs defs != [ ];

  mergeFree =
    path: defs:
    if defs == [ ] then
      throw "The option `${showPath path}' is used but not defined"
    else if b.all (d: b.isList d.value) defs then
      b.concatMap (d: d.value) defs
    else
      agree path defs;

  evalOption =
    path: opt: defs:
    let
      type = opt.type or lib.types.anything;
      defaults = lib.optional (opt ? default) {
        value = opt.default;
        priority = 1500;
        file = "the default";
      };
      chosen = highest (dischargeDefs defs ++ defaults);
      value =
        if chosen == [ ] then
          throw "The option `${showPath path}' is used but not defined"
        else
          mergeType path type chosen;
    in
    if type.check value then
      value
    else
      throw "The option `${showPath path}' is not of type `${type.name}' (defined in ${files chosen})";

  mergeType =
    path: type: defs:
    if type.kind == "submodule" then
      evalGroup path type.options defs
    else if type.kind == "attrsOf" then
      b.mapAttrs (n: evalElem (path ++ [ n ]) type.elemType) (zipDefs defs)
    else if type.kind == "listOf" then
      b.concatMap (
        d:
        if type.elemType.kind == "submodule" then
          map (
            e:
            evalGroup path type.elemType.options [
              {
                inherit (d) file;
                value = e;
              }
            ]
          ) d.value
        else
          d.value
      ) defs
    else if type.kind == "nullOr" then
      (
        let
          set = b.filter (d: d.value != null) defs;
        in
        if set == [ ] then null else mergeType path type.elemType set
      )
    else if type.kind == "lines" then
      b.concatStringsSep "\n" (map (d: d.value) defs)
    else if type.name == "anything" then
      evalFree path defs
    else
      agree path defs;

  evalElem =
    path: type: defs:
    evalOption path {
      inherit type;
    } defs;

  config = evalGroup [ ] options (
    map (m: {
      file = m.key;
      value = m.config;
    }) loaded
  );
in
{
  inherit config options;
}

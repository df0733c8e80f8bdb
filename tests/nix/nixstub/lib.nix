# A small stand-in for nixpkgs' lib: the functions hyperhive's Nix files call, with nixpkgs'
# semantics, and a module-system vocabulary (options, types, mkIf, mkMerge, priorities) that
# ./modules.nix evaluates. Without nixpkgs there is nothing else to evaluate against offline.
let
  b = builtins;
  lib = rec {
    # ------------------------------------------------------------------ functions

    inherit (b)
      attrNames
      concatMap
      concatStringsSep
      elem
      filter
      foldl'
      genList
      hasAttr
      head
      isAttrs
      isBool
      isFunction
      isInt
      isList
      isPath
      isString
      length
      listToAttrs
      mapAttrs
      replaceStrings
      tail
      toJSON
      ;

    id = x: x;
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: attrs: if cond then attrs else { };
    optionalString = cond: s: if cond then s else "";
    concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
    hasPrefix = prefix: s: b.substring 0 (b.stringLength prefix) s == prefix;
    removePrefix =
      prefix: s:
      if hasPrefix prefix s then
        b.substring (b.stringLength prefix) (b.stringLength s - b.stringLength prefix) s
      else
        s;
    filterAttrs =
      pred: attrs: listToAttrs (map (n: nameValuePair n attrs.${n}) (filter (n: pred n attrs.${n}) (attrNames attrs)));
    nameValuePair = name: value: { inherit name value; };
    genAttrs = names: f: listToAttrs (map (n: nameValuePair n (f n)) names);
    zipAttrs =
      sets:
      foldl' (
        acc: set: acc // mapAttrs (n: v: (acc.${n} or [ ]) ++ [ v ]) set
      ) { } sets;
    attrByPath =
      path: default: set:
      if path == [ ] then
        set
      else if isAttrs set && set ? ${head path} then
        attrByPath (tail path) default set.${head path}
      else
        default;
    isDerivation = x: isAttrs x && (x.type or null) == "derivation";
    getName = x: x.pname or (b.parseDrvName x.name).name;
    getLib = pkg: pkg.lib or pkg.out or pkg;
    getExe' = pkg: exe: "${pkg}/bin/${exe}";
    getExe = pkg: getExe' pkg (pkg.meta.mainProgram or (getName pkg));
    escapeShellArg = s: "'" + replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
    escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);

    licenses.mit = {
      spdxId = "MIT";
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];

    # Sources: the root directory itself; enough to see what a package is built from.
    fileset = {
      unions = xs: xs;
      toSource = { root, fileset }: {
        outPath = toString root;
        files = map toString fileset;
      };
    };

    # ------------------------------------------------------------------ module system

    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    literalMD = text: {
      _type = "literalMD";
      inherit text;
    };

    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption =
      name:
      mkOption {
        type = types.bool;
        default = false;
        example = true;
        description = "Whether to enable ${name}.";
      };
    mkPackageOption =
      pkgs: name:
      {
        default ? name,
        example ? null,
        extraDescription ? "",
        ...
      }:
      let
        path = if isList default then default else [ default ];
        attr = concatStringsSep "." path;
      in
      mkOption (
        {
          type = types.package;
          default = attrByPath path (throw "pkgs.${attr} does not exist") pkgs;
          defaultText = literalExpression "pkgs.${attr}";
          description = "The ${name} package to use. ${extraDescription}";
        }
        // optionalAttrs (example != null) {
          example = literalExpression "pkgs.${if isString example then example else example.text}";
        }
      );

    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkOrder = priority: content: {
      _type = "order";
      inherit priority content;
    };
    mkBefore = mkOrder 500;
    mkAfter = mkOrder 1500;

    # A type is a name, a check, and how several definitions merge. ./modules.nix merges
    # submodules and attrsOf/listOf element-wise; every other type needs equal definitions.
    types =
      let
        leaf = name: check: {
          inherit name check;
          kind = "leaf";
        };
      in
      rec {
        bool = leaf "bool" isBool;
        str = leaf "str" isString;
        nonEmptyStr = leaf "nonEmptyStr" (s: isString s && s != "");
        int = leaf "int" isInt;
        port = leaf "port" (v: isInt v && v >= 0 && v <= 65535);
        path = leaf "path" (v: isPath v || (isString v && hasPrefix "/" v));
        package = leaf "package" (v: isAttrs v && v ? outPath);
        raw = leaf "raw" (_: true);
        anything = leaf "anything" (_: true);
        strMatching = regex: leaf "strMatching ${regex}" (v: isString v && b.match regex v != null);
        enum = values: leaf "enum" (v: elem v values);
        lines = {
          name = "lines";
          check = isString;
          kind = "lines";
        };
        nullOr = t: {
          name = "nullOr ${t.name}";
          check = v: v == null || t.check v;
          kind = "nullOr";
          elemType = t;
        };
        listOf = t: {
          name = "listOf ${t.name}";
          check = v: isList v && b.all t.check v;
          kind = "listOf";
          elemType = t;
        };
        attrsOf = t: {
          name = "attrsOf ${t.name}";
          check = v: isAttrs v && b.all (n: t.check v.${n}) (attrNames v);
          kind = "attrsOf";
          elemType = t;
        };
        submodule = module: {
          name = "submodule";
          check = isAttrs;
          kind = "submodule";
          options = (if isFunction module then module { inherit lib; } else module).options;
        };
      };
  };
in
lib
